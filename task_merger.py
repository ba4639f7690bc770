"""Merge methods × merge spaces for task updates (LoRA adapters or full fine-tunes).

Methods are small pure functions over a list of same-shape tensors, registered with their search
grid. Spaces are transforms: a decomposition maps each task's layer update into the coordinates
the method merges, and maps the merged coordinates back to a full ΔW.

    W = W0 + c · reconstruct(method(coords_1, ..., coords_T))

Within one sweep a decomposition is computed once per layer, a merged update once per (method,
hyperparameters); changing the coefficient c only re-applies it (see `TaskMerger`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from models.registry import Registry
from models.updates import DoraFactors, LoraFactors, ReleasedUpdate, UpdateError

# ============================================================================ merge methods
Tensors = Sequence[torch.Tensor]


def task_arithmetic(deltas: Tensors) -> torch.Tensor:
    """Task Arithmetic (`tv`): the sum of the task updates."""
    return torch.stack(list(deltas)).sum(0)


def mean(deltas: Tensors) -> torch.Tensor:
    return torch.stack(list(deltas)).mean(0)


def trim_top_k(delta: torch.Tensor, top_k: float, one_more: bool = False) -> torch.Tensor:
    """Keeps the top_k % entries of largest magnitude (of the whole flattened tensor): int(d·K) of them, as
    the reference spec says, or int(d·K) + 1 with `one_more`, as the authors' code does."""
    if not 0 < top_k <= 100:
        raise ValueError(f"top_k is a percentage in (0, 100], got {top_k}")
    k = int(delta.numel() * top_k / 100) + (1 if one_more else 0)
    if k >= delta.numel():
        return delta.clone()
    flat = delta.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[flat.abs().topk(k).indices] = True
    return (flat * mask).view_as(delta)


def elect_and_disjoint_mean(pruned: Tensors) -> torch.Tensor:
    """TIES' sign election (sign of the sum; zeros take the majority sign) and disjoint mean."""
    stacked = torch.stack(list(pruned))
    elected = stacked.sum(0).sign()
    majority = elected.sum().sign()
    elected[elected == 0] = majority if majority != 0 else 1.0
    agree = (stacked.sign() == elected) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties(deltas: Tensors, top_k: float = 30.0, one_more: bool = False) -> torch.Tensor:
    return elect_and_disjoint_mean([trim_top_k(d, top_k, one_more) for d in deltas])


def dare_mask(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Drops each entry with probability p and rescales the survivors by 1/(1−p)."""
    if not 0 <= p < 1:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {p}")
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) >= p
    return delta * keep.to(delta.device) / (1 - p)


def dare(deltas: Tensors, p: float = 1e-5, generator: torch.Generator | None = None) -> torch.Tensor:
    generator = generator or torch.Generator().manual_seed(0)
    return task_arithmetic([dare_mask(d, p, generator) for d in deltas])


def dare_ties(deltas: Tensors, p: float = 1e-5, top_k: float = 30.0,
              generator: torch.Generator | None = None, one_more: bool = False) -> torch.Tensor:
    generator = generator or torch.Generator().manual_seed(0)
    return ties([dare_mask(d, p, generator) for d in deltas], top_k, one_more)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _svd(m: torch.Tensor):
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u, s, vh


def _orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns: P Qᵀ of m = P Σ Qᵀ."""
    p, _, qh = _svd(m)
    return p @ qh


def tsv(deltas: Tensors) -> torch.Tensor:
    """Task Singular Vectors: keep ⌊k/T⌋ leading triplets per task, decorrelate the stacked bases."""
    if deltas[0].dim() < 2:
        return mean(deltas)  # no singular vectors in a vector: fall back as the release does
    shape, dtype = deltas[0].shape, deltas[0].dtype
    mats = [_as_matrix(d) for d in deltas]
    k = min(mats[0].shape)
    r = max(1, k // len(mats))
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vh = _svd(m)
        us.append(u[:, :r]), ss.append(s[:r]), vs.append(vh[:r].T)
    u_perp = _orthogonalise(torch.cat(us, 1))
    v_perp = _orthogonalise(torch.cat(vs, 1))
    return (u_perp @ torch.diag(torch.cat(ss)) @ v_perp.T).to(dtype).reshape(shape)


def low_rank(m: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = _svd(m)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def cart(deltas: Tensors, rank: float = 0.04, beta: float = 0.1) -> torch.Tensor:
    """CART: the mean plus β times the rank-pruned centred task updates (⌈rank·k⌉ singular values)."""
    avg = mean(deltas)
    if deltas[0].dim() < 2:
        return avg  # the centred residuals of a vector sum to zero: CART reduces to the mean
    shape, dtype = avg.shape, avg.dtype
    k = min(_as_matrix(avg).shape)
    r = max(1, math.ceil(rank * k))
    residual = sum(low_rank(_as_matrix(d - avg).double(), r) for d in deltas)
    return (avg + beta * residual.to(dtype).reshape(shape))


def regmean(deltas: Tensors, grams: Sequence[torch.Tensor] | None = None, alpha: float = 0.9) -> torch.Tensor:
    """RegMean: the ΔW closest to every task's on its own inputs, min Σ_i ‖X_i (ΔW − ΔW_i)ᵀ‖², i.e.
    ΔW = (Σ_i ΔW_i G_i)(Σ_i G_i)⁻¹ with G_i = X_iᵀX_i/rows, off-diagonals shrunk by alpha. Tensors without
    Grams (vectors, layers that are not linear) take the mean."""
    if grams is None or deltas[0].dim() != 2:
        return mean(deltas)
    if not 0 <= alpha <= 1:
        raise ValueError(f"RegMean's off-diagonal factor alpha must be in [0, 1], got {alpha}")
    if len(grams) != len(deltas) or any(g.shape != (deltas[0].shape[1],) * 2 for g in grams):
        raise ValueError(f"RegMean needs one {deltas[0].shape[1]}×{deltas[0].shape[1]} Gram matrix per task, got "
                         f"{[tuple(g.shape) for g in grams]}")
    shrunk = [alpha * g.double() + (1 - alpha) * torch.diag(torch.diagonal(g.double())) for g in grams]
    rhs = sum(g @ d.double().T for g, d in zip(shrunk, deltas))
    return torch.linalg.lstsq(sum(shrunk), rhs).solution.T.to(deltas[0].dtype).contiguous()


def isotropize(m: torch.Tensor) -> torch.Tensor:
    """Replaces the non-zero singular values of a merged matrix by their mean (as the release does: the
    directions a merge does not span stay empty)."""
    if m.dim() < 2:
        return m
    u, s, vh = _svd(_as_matrix(m))
    keep = s > SINGULAR_FLOOR
    if not keep.any():
        return m
    return ((u[:, keep] * s[keep].mean()) @ vh[keep]).to(m.dtype).reshape(m.shape)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor] | None  # None: the merge is not ours (peft_combination)
    defaults: dict = field(default_factory=dict)
    grid: dict[str, tuple] = field(default_factory=dict)  # searched after c, in this order
    seeded: bool = False
    trims: bool = False  # keeps the top-K entries: takes the trim rule (one_more)
    # data-dependent: "inputs" (each task's layer inputs through its own update) or "chain" (through the
    # model merged up to that layer); fn then takes each layer's Gram matrices (`grams`)
    statistics: str = ""
    peft_combination: str = ""  # merged by PEFT's add_weighted_adapter with this combination_type
    # a fixed linear combination of the updates: every space's change of basis commutes with it, so every
    # space gives the same ΔW, and it is computed in full space (bit-identical across spaces); with Iso-C,
    # which flattens the spectrum of the space's own coordinates, in the space asked
    linear: bool = False
    description: str = ""

    def with_defaults(self, hparams: dict) -> dict:
        """The method's hyperparameters: its defaults, overridden by `hparams` (an unknown name is an error)."""
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes {sorted(self.defaults) or 'no hyperparameters'}, got {sorted(unknown)}")
        return {**self.defaults, **hparams}


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")
register_merge_method = MERGE_METHODS.register


TOP_K_GRID = tuple(range(100, 0, -10))
DARE_P_GRID = (1e-5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
CART_RANK_GRID = (0.04, 0.08, 0.16, 0.32)
REGMEAN_ALPHA_GRID = (1.0, 0.9, 0.7, 0.5, 0.3, 0.1)
DENSITY_GRID = tuple(k / 100 for k in TOP_K_GRID)  # PEFT's density: the share of entries kept

register_merge_method(MergeMethod("tv", task_arithmetic, linear=True, description="Task Arithmetic: sum of updates"))
register_merge_method(MergeMethod("mean", mean, linear=True, description="average of updates"))
register_merge_method(MergeMethod("ties", ties, {"top_k": 30.0}, {"top_k": TOP_K_GRID}, trims=True,
                                  description="TIES: trim top-K %, elect sign, disjoint mean"))
register_merge_method(MergeMethod("dare", dare, {"p": 1e-5}, {"p": DARE_P_GRID}, seeded=True,
                                  description="DARE: random drop p, rescale, sum"))
register_merge_method(MergeMethod("dare_ties", dare_ties, {"p": 1e-5, "top_k": 30.0},
                                  {"top_k": TOP_K_GRID, "p": DARE_P_GRID}, seeded=True, trims=True,
                                  description="DARE masks, then TIES"))
register_merge_method(MergeMethod("tsv", tsv, description="Task Singular Vectors"))
register_merge_method(MergeMethod("cart", cart, {"rank": 0.04, "beta": 0.1}, {"rank": CART_RANK_GRID},
                                  description="CART: centred, rank-pruned residuals"))

register_merge_method(MergeMethod("regmean", regmean, {"alpha": 0.9}, {"alpha": REGMEAN_ALPHA_GRID},
                                  statistics="inputs", description="RegMean: per-layer least squares on each "
                                  "task's input Gram matrix"))
register_merge_method(MergeMethod("chain_of_merges", regmean, {"alpha": 0.9}, {"alpha": REGMEAN_ALPHA_GRID},
                                  statistics="chain", description="Chain of Merges: RegMean layer by layer, "
                                  "inputs through the model merged so far"))
# PEFT's add_weighted_adapter, as LoRA users run it: factors merged separately (cross terms B_i·A_j),
# concatenated ranks (cat), or ΔW merged then truncated to rank r (*_svd)
for _combination in ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"):
    _prunes = _combination not in ("linear", "cat", "svd")
    register_merge_method(MergeMethod(
        f"peft_{_combination}", None, {"density": 0.3} if _prunes else {},
        {"density": DENSITY_GRID} if _prunes else {}, seeded=_combination.startswith("dare"),
        peft_combination=_combination, description=f"PEFT add_weighted_adapter, combination_type {_combination}"))


get_merge_method = MERGE_METHODS.lookup


# ============================================================================ merge spaces
SINGULAR_FLOOR = 1e-5  # singular values at or below this are dropped from joint bases


@dataclass
class Decomposition:
    """Per-task coordinates of one layer and the map from merged coordinates back to ΔW."""

    coords: list[torch.Tensor]
    reconstruct: Callable[[torch.Tensor], torch.Tensor]


def _materialise(u) -> torch.Tensor:
    return u.delta() if isinstance(u, (LoraFactors, DoraFactors)) else u


def full_space(updates: list) -> Decomposition:
    """Merge the materialised ΔW_i = B_i A_i (α/r) (or full updates) directly."""
    return Decomposition([_materialise(u) for u in updates], lambda merged: merged)


def knots_space(updates: list) -> Decomposition:
    """KnOTS: SVD of [ΔW_1 | … | ΔW_T] = U S Vᵀ; merge the per-task blocks V_i; ΔW = U S M(V_i)."""
    deltas = [_materialise(u) for u in updates]
    shape, dtype = deltas[0].shape, deltas[0].dtype
    mats = [_as_matrix(d).double() for d in deltas]
    u, s, vh = _svd(torch.cat(mats, dim=1))
    keep = s > SINGULAR_FLOOR
    u, s, vh = u[:, keep], s[keep], vh[keep]
    widths = [m.shape[1] for m in mats]
    blocks = list(torch.split(vh, widths, dim=1))
    us = u * s
    return Decomposition(blocks, lambda merged: (us @ merged).to(dtype).reshape(shape))


def _basis(m: torch.Tensor, side: str) -> torch.Tensor:
    u, s, vh = _svd(m)
    keep = s > SINGULAR_FLOOR
    return u[:, keep] if side == "left" else vh[keep].T


def require_lora_factors(updates: list) -> None:
    if not all(isinstance(u, LoraFactors) for u in updates):
        raise UpdateError("core space needs LoRA factors (A, B) for every task; full updates have none, and a DoRA "
                          "layer is no product B·A. Use --merge_space full or knots for them.")


def core_space(updates: list) -> Decomposition:
    """Core space: shared bases from the stacked A's and B's; merge the small cores U_Bᵀ B_i A_i V_A."""
    require_lora_factors(updates)
    a_stack = torch.cat([u.A.double() for u in updates], dim=0)
    b_stack = torch.cat([u.scaling * u.B.double() for u in updates], dim=1)
    v_ref = _basis(a_stack, "right")  # n × k_A
    u_ref = _basis(b_stack, "left")  # m × k_B
    dtype = updates[0].A.dtype
    cores = [u_ref.T @ (u.scaling * u.B.double()) @ (u.A.double() @ v_ref) for u in updates]
    return Decomposition(cores, lambda merged: (u_ref @ merged @ v_ref.T).to(dtype))


MERGE_SPACES: dict[str, Callable[[list], Decomposition]] = {
    "full": full_space, "knots": knots_space, "core": core_space}


# ============================================================================ merging whole updates
def _layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _zero_like(u):
    if isinstance(u, LoraFactors):
        return LoraFactors(torch.zeros_like(u.A), torch.zeros_like(u.B), u.scaling)
    return torch.zeros_like(u)


def _scaled(u, c: float):
    if c == 1.0:
        return u
    return LoraFactors(u.A, u.B, u.scaling * c) if isinstance(u, LoraFactors) else u * c


def check_same_base(updates: Sequence[ReleasedUpdate]) -> None:
    fps = {u.metadata.get("base_fingerprint") for u in updates}
    if len(fps) > 1:
        raise UpdateError(f"the updates were trained on different bases (fingerprints {sorted(map(str, fps))}); "
                          f"only updates of the same base can be merged")


class TaskMerger:
    """Merges T released updates layer by layer, caching decompositions and merged updates.

    `task_coefficients` (one per update) multiply each ΔW_i before merging. Layers that only some
    updates touch get zeros from the others. Tensors a space cannot decompose (vectors such as
    biases and norms, which only full updates carry) are merged in full space and listed in
    `fallbacks`, never dropped. Data-dependent methods (RegMean) get `grams(params)`: parameter name -> one
    input Gram matrix per update (eval_scripts.merge_statistics computes them).
    """

    def __init__(self, updates: Sequence[ReleasedUpdate], space: str = "full",
                 task_coefficients: Sequence[float] | None = None, seed: int = 0, trim_one_more: bool = False,
                 grams: Callable[[dict], dict[str, list[torch.Tensor]]] | None = None):
        if not updates:
            raise ValueError("nothing to merge: pass at least one update")
        if space not in MERGE_SPACES:
            raise KeyError(f"unknown merge space {space!r}; choose one of {sorted(MERGE_SPACES)}")
        check_same_base(updates)
        coefficients = list(task_coefficients) if task_coefficients is not None else [1.0] * len(updates)
        if len(coefficients) != len(updates):
            raise ValueError(f"{len(coefficients)} task coefficients for {len(updates)} updates")
        self.updates, self.space, self.seed, self.trim_one_more = list(updates), space, seed, trim_one_more
        self.task_coefficients, self.grams = coefficients, grams
        self.names = sorted(set().union(*(u.names() for u in updates)))
        self.fallbacks: list[str] = []
        self._decompositions: dict[tuple[str, str], Decomposition] = {}
        self._merged: dict[tuple, dict[str, torch.Tensor]] = {}

    def _layer_inputs(self, name: str) -> list:
        """Each task's (coefficient-scaled) update of one layer; LoRA factors only if every task has them."""
        layers = [(u.lora if u.kind == "lora" else u.full).get(name) for u in self.updates]
        template = next(x for x in layers if x is not None)
        if not all(isinstance(x, LoraFactors) for x in layers if x is not None):  # full ΔW (DoRA: W(1) − W0)
            layers = [None if x is None else _materialise(x) for x in layers]
            template = _materialise(template)
        return [_scaled(x, c) if x is not None else _zero_like(template)
                for x, c in zip(layers, self.task_coefficients)]

    def decomposition(self, name: str, space: str | None = None) -> Decomposition:
        """The layer's updates in `space` (default: the merger's own), cached. A linear merge asks for full
        space whatever the merger's: the merger's space is then only checked (and its fallbacks listed)."""
        space = space or self.space
        if (space, name) not in self._decompositions:
            inputs = self._layer_inputs(name)
            if not isinstance(inputs[0], LoraFactors) and inputs[0].dim() < 2:
                if self.space != "full" and name not in self.fallbacks:
                    self.fallbacks.append(name)  # vectors (biases, norms) have no factorisation
                self._decompositions[space, name] = full_space(inputs)
            else:
                if self.space == "core" != space:  # computed elsewhere, still only for LoRA factors
                    require_lora_factors(inputs)
                self._decompositions[space, name] = MERGE_SPACES[space](inputs)
        return self._decompositions[space, name]

    def merge(self, method: str, isotropic: bool = False, **hparams) -> dict[str, torch.Tensor]:
        """The merged ΔW per parameter name (before the global coefficient), cached."""
        spec = get_merge_method(method)
        params = spec.with_defaults(hparams)
        key = (method, isotropic, tuple(sorted(params.items())))
        if spec.peft_combination:
            raise ValueError(f"{method} merges whole adapters through PEFT: use eval_scripts.peft_merge.PeftMerger")
        if key not in self._merged:
            grams = {}
            if spec.statistics:
                if self.space != "full":
                    raise UpdateError(f"{method} merges in full space (its Gram matrices are of the layer's inputs); "
                                      f"use --merge_space full")
                if self.grams is None:
                    raise ValueError(f"{method} needs each layer's input Gram matrices: pass grams "
                                     f"(eval_scripts.merge_statistics)")
                grams = self.grams(params)
            merged = {}
            space = "full" if spec.linear and not isotropic else self.space
            for name in self.names:
                d = self.decomposition(name, space)
                kwargs = dict(params)
                if spec.seeded:
                    kwargs["generator"] = torch.Generator().manual_seed(_layer_seed(self.seed, name))
                if spec.trims:
                    kwargs["one_more"] = self.trim_one_more
                if spec.statistics:
                    kwargs["grams"] = grams.get(name)
                coords = spec.fn(d.coords, **kwargs)
                # isotropized in the space's own coordinates (Core: the small core matrix), then rebuilt
                merged[name] = d.reconstruct(isotropize(coords) if isotropic else coords)
            self._merged[key] = merged
        return self._merged[key]


def apply_merged(net: torch.nn.Module, base_state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor],
                 coefficient: float) -> None:
    """Sets W = W0 + c · M in place for every merged parameter (all others stay at W0)."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, delta in merged.items():
            p = params[name]
            p.copy_(base_state[name] + coefficient * delta.to(p.device, p.dtype).reshape(p.shape))
