"""Post-hoc defences against merging, the baselines of the paper's Table 1: PaRaMS and Merge-Lock.

Both take a finished (unprotected) update and re-parameterise the Transformer's weights so that the network
computes the same function while its weights leave the basin that the base's other fine-tunes share; merged
with them, it then breaks. Implemented from the papers' descriptions:
- PaRaMS (Wei, Yu & Sakuma, ICCV 2025, arXiv 2503.07661): each MLP's hidden units permuted by the assignment
  that moves them farthest from the base's units, and random multi-head scaling: per head h, Q × a_h, K / a_h,
  V × b_h and O's inputs from head h / b_h. (Its optional dropout-based pruning is not included.)
- Merge-Lock (Wang et al., arXiv 2509.01548): per head, a random invertible matrix R_h on the QK branch
  (Q_h R_h, K_h R_h⁻ᵀ) and another, S_h, on the VO branch (V_h S_h, O's inputs from head h S_h⁻¹).
- PaRaMS on a LoRA adapter (our construction; the reference spec does not describe the paper's): the
  scaling acts on a random k-dimensional subspace of each head, orthogonal to the base's biases, so the
  re-parameterised ΔW is low rank (the adapter's rank + k per head, per matrix) and the biases, which an
  adapter cannot change, stay exact. The MLP permutation needs full weights and is left out.
Every transform runs in float64 and the result is checked against the original on random inputs before it
is written. They need attention (W_Q, W_K, W_V, W_O per head): a ConvNeXt has none and is refused.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.backbones import Base
from models.export import release_base
from models.options import option
from models.registry import Registry
from models.runtime import provenance
from models.updates import (RELEASE_IDENTITY_KEYS, DoraFactors, ReleasedUpdate, UpdateError, load_update,
                            write_full_release, write_lora_release)
from task_merger import apply_merged

# Outputs of the defended and the original model may differ by this much, relative to the outputs' scale
MAX_RELATIVE_OUTPUT_CHANGE = 1e-4


@dataclass(frozen=True)
class TransformerBlock:
    """One encoder layer: attention (q/k/v/out_proj, `heads` heads of `head_dim`) and an MLP (fc1, fc2)."""

    prefix: str  # e.g. "vision_model.encoder.layers.0."
    heads: int
    head_dim: int

    def attention(self, projection: str, kind: str = "weight") -> str:
        return f"{self.prefix}self_attn.{projection}_proj.{kind}"

    def mlp(self, layer: str, kind: str = "weight") -> str:
        return f"{self.prefix}mlp.{layer}.{kind}"


def transformer_blocks(net: nn.Module, base_name: str) -> list[TransformerBlock]:
    """The encoder layers of an HF CLIP-style tower; a network without attention is refused."""
    blocks = []
    for name, module in net.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        projections = [getattr(attn, f"{p}_proj", None) for p in ("q", "k", "v", "out")]
        if attn is None or not all(isinstance(p, nn.Linear) and p.bias is not None for p in projections):
            continue
        if not (isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)):
            continue
        blocks.append(TransformerBlock(f"{name}.", int(attn.num_heads), int(attn.head_dim)))
    if not blocks:
        raise UpdateError(f"base {base_name} has no Transformer attention (self_attn with q/k/v/out_proj): PaRaMS "
                          f"and Merge-Lock re-parameterise attention heads (W_Q→W_Q R, W_K→W_K R⁻ᵀ), so they do not "
                          f"apply to this architecture; protect it with Trap² instead")
    return blocks


def _log_uniform(n: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    """n factors with log-uniform magnitude in [1/strength, strength]."""
    return torch.exp((2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * math.log(strength))


def _random_invertible(d: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    """U diag(σ) Vᵀ with Haar-random orthogonal U, V and σ log-uniform in [1/strength, strength]: a random
    invertible matrix whose condition number is at most strength², so float32 keeps the function."""
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return u @ torch.diag(_log_uniform(d, strength, gen)) @ v.T


def reparameterise_attention(w: dict[str, torch.Tensor], block: TransformerBlock, qk: list[torch.Tensor],
                             vo: list[torch.Tensor]) -> None:
    """In place, per head h: Q_h → Q_h M_h, K_h → K_h M_h⁻ᵀ (so Q_h K_hᵀ is unchanged), V_h → V_h N_h and the
    out-projection's inputs from head h → N_h⁻¹ (so the attention output is unchanged)."""
    m_inv, n_inv = torch.block_diag(*map(torch.linalg.inv, qk)), torch.block_diag(*map(torch.linalg.inv, vo))
    lefts = (("q", torch.block_diag(*qk).T), ("k", m_inv), ("v", torch.block_diag(*vo).T))
    for projection, left in lefts:  # an nn.Linear computes x Wᵀ + b, so Q M means Mᵀ W and Mᵀ b
        for kind in ("weight", "bias"):
            w[block.attention(projection, kind)] = left @ w[block.attention(projection, kind)]
    w[block.attention("out")] = w[block.attention("out")] @ n_inv.T


def unit_permutation(w: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], block: TransformerBlock,
                     farthest: bool) -> torch.Tensor:
    """The permutation π of the MLP's hidden units (unit i takes unit π[i]'s weights) that maximises (PaRaMS) or
    minimises (the realigning attacker) the summed squared distance of every unit's fc1 row, bias and fc2
    column from the base's unit i."""
    from scipy.optimize import linear_sum_assignment

    def units(state):
        return torch.cat([state[block.mlp("fc1")], state[block.mlp("fc1", "bias")][:, None],
                          state[block.mlp("fc2")].T], dim=1)

    distance = torch.cdist(units(w0), units(w)) ** 2
    rows, cols = linear_sum_assignment(distance.numpy(), maximize=farthest)
    return torch.as_tensor(cols[rows.argsort()])


def permute_mlp(w: dict[str, torch.Tensor], block: TransformerBlock, perm: torch.Tensor) -> None:
    """In place: hidden unit i of the MLP takes unit perm[i]'s weights (the function is unchanged)."""
    w[block.mlp("fc1")], w[block.mlp("fc1", "bias")] = w[block.mlp("fc1")][perm], w[block.mlp("fc1", "bias")][perm]
    w[block.mlp("fc2")] = w[block.mlp("fc2")][:, perm]


def params_full(w: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], blocks: list[TransformerBlock],
                gen: torch.Generator, strength: float) -> None:
    """PaRaMS on complete weights, in place: the farthest MLP permutation, then random multi-head scaling."""
    for block in blocks:
        permute_mlp(w, block, unit_permutation(w, w0, block, farthest=True))
        eye = torch.eye(block.head_dim, dtype=torch.float64)
        a, b = _log_uniform(block.heads, strength, gen), _log_uniform(block.heads, strength, gen)
        reparameterise_attention(w, block, [x * eye for x in a], [x * eye for x in b])


def merge_lock_full(w: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], blocks: list[TransformerBlock],
                    gen: torch.Generator, strength: float) -> None:
    """Merge-Lock on complete weights, in place: per head, random invertible matrices on QK and on VO."""
    for block in blocks:
        reparameterise_attention(w, block, [_random_invertible(block.head_dim, strength, gen) for _ in range(block.heads)],
                                 [_random_invertible(block.head_dim, strength, gen) for _ in range(block.heads)])


def realign_to_base(w: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], blocks: list[TransformerBlock]) -> None:
    """The attacker's answer to both defences, in place: the function-preserving re-parameterisation nearest the
    base. Each MLP's units take the permutation nearest the base's; per head, G = [W0 b0]·[W b]⁺ (least squares)
    maps the Q (and, separately, the V) projection back onto the base's, and K and O follow as the symmetry
    demands (K by G⁻ᵀ, O's inputs by G⁻¹). An update that was never re-parameterised comes back nearly as it was."""
    def back(projection: str, h: int) -> torch.Tensor:
        rows = slice(h * block.head_dim, (h + 1) * block.head_dim)

        def stacked(state):
            return torch.cat([state[block.attention(projection)][rows],
                              state[block.attention(projection, "bias")][rows, None]], dim=1)
        return stacked(w0) @ torch.linalg.pinv(stacked(w))

    for block in blocks:
        permute_mlp(w, block, unit_permutation(w, w0, block, farthest=False))
        reparameterise_attention(w, block, [back("q", h).T for h in range(block.heads)],
                                 [back("v", h).T for h in range(block.heads)])


def realigned_update(update: ReleasedUpdate, base_state: dict[str, torch.Tensor],
                     blocks: list[TransformerBlock]) -> ReleasedUpdate:
    """The update as a realigning attacker merges it: W0 + ΔW realigned to the base, as a full update (a LoRA
    adapter's realigned ΔW is full rank). It keeps the source update's content hash, which names the update it
    came from."""
    w0 = {n: t.double() for n, t in base_state.items() if t.is_floating_point()}
    w = {n: t + update.delta(n).double() if n in update.names() else t for n, t in w0.items()}
    realign_to_base(w, w0, blocks)
    deltas = {n: (w[n] - w0[n]).float() for n in w0 if n in update.names() or not torch.equal(w[n], w0[n])}
    realigned = ReleasedUpdate(update.path, "full", update.metadata, full=deltas)
    realigned.__dict__["content_hash"] = update.content_hash  # the cached property: the source update's hash
    return realigned


def _head_subspace(block: TransformerBlock, rank: int, avoid: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """(heads·head_dim) × (heads·rank): per head, `rank` orthonormal directions of its coordinates orthogonal
    to the given vectors' parts in that head (the biases the subspace must leave alone)."""
    columns = []
    for h in range(block.heads):
        rows = slice(h * block.head_dim, (h + 1) * block.head_dim)
        fixed = torch.stack([v[rows] for v in avoid], dim=1)
        u, s, _ = torch.linalg.svd(fixed, full_matrices=False)
        u = u[:, s > 1e-12 * max(s.max().item(), 1e-300)]
        g = torch.randn(block.head_dim, rank, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(g - u @ (u.T @ g))
        column = torch.zeros(block.heads * block.head_dim, rank, dtype=torch.float64)
        column[rows] = q
        columns.append(column)
    return torch.cat(columns, dim=1)


def params_lora(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], w0: dict[str, torch.Tensor], blocks, gen,
                strength, rank_per_head: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PaRaMS' head scaling on the subspace P = QQᵀ of each head (M = I + Q diag(a − 1) Qᵀ, symmetric), written as
    low-rank factors: for a left factor L, L(W0 + BA) − W0 = [L·B | Q diag(a − 1)] [A ; Qᵀ W0]; for the out
    projection (right factor N⁻¹), [B | W0 Q diag(1/b − 1)] [A N⁻¹ ; Qᵀ]. `factors`: name → (B, A), ΔW = B A."""
    out = {}
    for block in blocks:
        if rank_per_head > block.head_dim - 3:
            raise UpdateError(f"--rank_per_head {rank_per_head} leaves no room in heads of {block.head_dim} "
                              f"dimensions (at most {block.head_dim - 3})")
        b0 = {p: w0[block.attention(p, "bias")] for p in ("q", "k", "v")}
        qk = _head_subspace(block, rank_per_head, [b0["q"], b0["k"]], gen)
        vo = _head_subspace(block, rank_per_head, [b0["v"]], gen)
        a = _log_uniform(block.heads, strength, gen).repeat_interleave(rank_per_head)
        b = _log_uniform(block.heads, strength, gen).repeat_interleave(rank_per_head)
        for projection, basis, factor in (("q", qk, a), ("k", qk, 1 / a), ("v", vo, b)):
            name = block.attention(projection)
            B, A = factors.get(name, _no_factors(w0[name]))
            left = torch.eye(basis.shape[0], dtype=torch.float64) + basis @ torch.diag(factor - 1) @ basis.T
            out[name] = (torch.cat([left @ B, basis @ torch.diag(factor - 1)], 1), torch.cat([A, basis.T @ w0[name]]))
        name = block.attention("out")
        B, A = factors.get(name, _no_factors(w0[name]))
        n_inv = torch.eye(vo.shape[0], dtype=torch.float64) + vo @ torch.diag(1 / b - 1) @ vo.T
        out[name] = (torch.cat([B, w0[name] @ vo @ torch.diag(1 / b - 1)], 1), torch.cat([A @ n_inv, vo.T]))
    return out


def _no_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(weight.shape[0], 0, dtype=torch.float64), torch.zeros(0, weight.shape[1], dtype=torch.float64)


@dataclass(frozen=True)
class Defence:
    """A post-hoc defence: `full(w, w0, blocks, gen, strength)` re-parameterises complete weights in place;
    `lora` (or None) the adapter variant, returning new factors."""

    name: str
    title: str
    full: Callable
    lora: Callable | None = None


DEFENCES: Registry[Defence] = Registry("defence")
DEFENCES.register(Defence("params", "PaRaMS", params_full, params_lora))
DEFENCES.register(Defence("merge_lock", "Merge-Lock", merge_lock_full))


@dataclass
class DefenceOptions:
    strength: float = option(4.0, "the defences' scale factors and the random matrices' singular values lie in "
                                  "[1/strength, strength]")
    rank_per_head: int = option(4, "PaRaMS on a LoRA adapter: dimensions of each head it scales (the adapter's rank "
                                   "grows by this many per head)")


def _output_change(base: Base, state0: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                   after: dict[str, torch.Tensor], seed: int) -> float:
    """max |f_after(x) − f_before(x)| / max |f_before(x)| over a seeded batch of random images."""
    spec = base.backbone.spec
    x = torch.randn(4, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(seed))
    outputs = []
    with torch.no_grad():
        for deltas in (before, after):
            apply_merged(base.backbone.net, state0, deltas, 1.0)
            outputs.append(base.backbone(x).double())
        apply_merged(base.backbone.net, state0, {n: torch.zeros_like(v) for n, v in after.items()}, 1.0)
    return ((outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max().clamp_min(1e-12)).item()


def defend_update(update_folder: str | Path, defence_name: str, out_dir: str | Path,
                  options: DefenceOptions | None = None, seed: int = 0, base_options: dict | None = None) -> Path:
    """Applies a post-hoc defence to a released update and writes the defended release (the same format:
    a full update stays full, a LoRA adapter becomes a LoRA adapter of higher rank)."""
    defence = DEFENCES.lookup(defence_name)
    options = options or DefenceOptions()
    if not options.strength > 1:
        raise UpdateError(f"--strength must be > 1 (scale factors lie in [1/strength, strength]), got {options.strength}")
    update = load_update(update_folder)
    base = release_base(update, base_options)
    net = base.backbone.net
    blocks = transformer_blocks(net, base.name)
    if update.kind == "lora" and defence.lora is None:
        raise UpdateError(f"{defence.title} re-parameterises complete attention weights and has no adapter variant; "
                          f"defend a full update, or export the adapter as one first (python -m "
                          f"training_scripts.export)")
    state0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    w0 = {k: v.double() for k, v in state0.items()}
    gen = torch.Generator().manual_seed(seed)
    before = {n: update.delta(n) for n in update.names()}
    if update.kind == "full":
        w = {n: w0[n] + before.get(n, torch.zeros_like(w0[n])).double() for n in w0}
        defence.full(w, w0, blocks, gen, options.strength)
        after = {n: (w[n] - w0[n]).float() for n in w0 if n in before or not torch.equal(w[n], w0[n])}
        factors = None
    else:
        if any(isinstance(f, DoraFactors) for f in update.lora.values()):
            raise UpdateError(f"{update.path} is a DoRA adapter: the adapter variant re-factors ΔW = B·A, which a DoRA "
                              f"layer is not; export it as a full update first (python -m training_scripts.export)")
        source = {n: (f.scaling * f.B.double(), f.A.double()) for n, f in update.lora.items()}
        factors = defence.lora(source, w0, blocks, gen, options.strength, options.rank_per_head)
        factors.update({n: ba for n, ba in source.items() if n not in factors})
        after = {n: (B @ A).float() for n, (B, A) in factors.items()}
    change = _output_change(base, state0, before, after, seed)
    if change > MAX_RELATIVE_OUTPUT_CHANGE:
        raise UpdateError(f"{defence.title} changed the model's outputs by {change:.2e} (relative), more than "
                          f"{MAX_RELATIVE_OUTPUT_CHANGE:g}: float32 lost the function at --strength {options.strength}; "
                          f"lower it")
    metadata = {**{k: v for k, v in update.metadata.items() if k in RELEASE_IDENTITY_KEYS},
                "task": update.task, "lambda_reg": update.metadata.get("lambda_reg", 0.0),
                "seed": update.metadata.get("seed"),
                "defence": {"name": defence.name, "title": defence.title, "seed": seed, **dataclasses.asdict(options),
                            "source": str(update.path), "source_hash": update.content_hash,
                            "relative_output_change": change},
                "provenance": provenance(base.fingerprint)}
    out = Path(out_dir)
    if factors is None:
        return write_full_release(out, after, metadata)
    return write_lora_release(out, factors, metadata)
