"""The Trap² objective, the one implementation every trainer uses.

    J(ΔW) = L(W0 + ΔW) − λ · w(s) · L(W0 + s·ΔW),   s ~ Unif([s_min, 1−δ] ∪ [1+δ, s_max])

The update stays useful at s = 1 and is pushed to break at every other scale, so merging (which
rescales each update by roughly 1/N) moves it off its working point. A departure, off by default: decoy
partners D (Decoys: released updates or random ones) add the term − λ_d · L(W0 + ΔW + m·D), for merges that
keep the update at s = 1.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.updates import ScaledUpdate

SCALE_WEIGHTS: dict[str, Callable[[float], float]] = {
    "inv": lambda s: 1.0 / s,  # paper default for vision
    "inv_sqrt": lambda s: 1.0 / math.sqrt(s),  # release default of the math trainer
    "none": lambda s: 1.0,
}


@dataclass(frozen=True)
class ScaleSampler:
    """Uniform distribution on [s_min, 1−δ] ∪ [1+δ, s_max], sampled exactly (no rejection)."""

    s_min: float = 0.05
    s_max: float = 2.0
    delta: float = 0.05

    def __post_init__(self) -> None:
        if not self.s_min > 0:
            raise ValueError(f"s_min must be > 0 (w(s) divides by s), got {self.s_min}")
        if self.delta < 0:
            raise ValueError(f"the band delta must be >= 0, got {self.delta}")
        if self.low_length < 0 or self.high_length < 0 or self.low_length + self.high_length <= 0:
            raise ValueError(
                f"empty scale range: need s_min <= 1-delta <= 1+delta <= s_max with some room, got "
                f"s_min={self.s_min}, delta={self.delta}, s_max={self.s_max}")

    def __str__(self) -> str:
        return f"[{self.s_min:g}, {1 - self.delta:g}] ∪ [{1 + self.delta:g}, {self.s_max:g}]"

    @property
    def low_length(self) -> float:
        return (1.0 - self.delta) - self.s_min

    @property
    def high_length(self) -> float:
        return self.s_max - (1.0 + self.delta)

    def sample(self, n: int, generator: torch.Generator) -> list[float]:
        """n scales; one uniform draw over the joined length is mapped onto the two intervals."""
        u = torch.rand(n, generator=generator, dtype=torch.float64) * (self.low_length + self.high_length)
        low = u < self.low_length
        s = torch.where(low, self.s_min + u, (1.0 + self.delta) + (u - self.low_length))
        return s.tolist()


class RngSnapshot:
    """Global RNG state (CPU and, where used, CUDA) so both passes draw the same dropout masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class ReplayDropout(nn.Dropout):
    """nn.Dropout whose masks, drawn in a recorded pass, are reused by replayed passes over the same batch.

    Drawing a mask costs more than the matrix products around it on the CPU (a third of a LoRA
    pass on the offline ViT), and the off-nominal passes need exactly the masks of the nominal one.
    Outside a recorded or replayed pass it is nn.Dropout; a recorded mask is drawn as the CPU's
    nn.Dropout draws it (noise = bernoulli(1 − p) / (1 − p), output = x · noise), so CPU runs keep
    their bits.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__(p, inplace)
        self.mode: str | None = None  # None | "record" | "replay"
        self.tape: list[torch.Tensor] = []
        self.cursor = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None or not self.training or self.p == 0:
            return super().forward(x)
        if self.mode == "replay":
            if self.cursor >= len(self.tape):
                raise RuntimeError("a replayed pass called dropout more often than the recorded pass did")
            noise = self.tape[self.cursor]
            self.cursor += 1
        else:
            noise = torch.empty_like(x).bernoulli_(1 - self.p).div_(1 - self.p)
            self.tape.append(noise)
        return x * noise


class DropoutReplay:
    """The ReplayDropout modules of a model, switched together between record, replay and off."""

    def __init__(self, model: nn.Module):
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    setattr(module, name, ReplayDropout(child.p, child.inplace))
        self.modules = [m for m in model.modules() if isinstance(m, ReplayDropout)]

    @contextmanager
    def _mode(self, mode: str):
        for m in self.modules:
            m.mode, m.cursor = mode, 0
            if mode == "record":
                m.tape = []
        try:
            yield
        finally:
            for m in self.modules:
                m.mode = None

    def recording(self):
        return self._mode("record")

    def replaying(self):
        return self._mode("replay")

    def clear(self) -> None:
        for m in self.modules:
            m.tape = []


class Decoys:
    """Other updates D that a training step adds beside the one being trained, W0 + ΔW + m·D with m ~ U[lo, hi]:
    stand-ins for a merge partner. Trap² pushes that loss up as well, so the update also breaks where a merge
    keeps it at its own scale (c ≈ 1 in a two-task merge) and only a partner's update stands beside it, the
    case scale sensitivity alone does not reach.

    D is added as a forward hook on each linear layer it names (output += m · x Dᵀ), so LoRA, DoRA and full
    updates see the same thing and no weight is written. Subclasses say where D comes from (`draw`).
    """

    def __init__(self, scale: Sequence[float]):
        check_decoy_scale(scale)
        self.scale = (float(scale[0]), float(scale[1]))

    def draw(self, generator: torch.Generator) -> tuple[list[tuple[nn.Module, torch.Tensor]], float]:
        """A decoy, as (layer, D) pairs, and how much of it, m: from the objective's generator, so a resumed run
        draws the same."""
        raise NotImplementedError

    def _multiplier(self, generator: torch.Generator) -> float:
        lo, hi = self.scale
        return lo + (hi - lo) * float(torch.rand(1, generator=generator, dtype=torch.float64))

    @staticmethod
    @contextmanager
    def added(decoy: list[tuple[nn.Module, torch.Tensor]], m: float):
        """`decoy` (from `draw`), times m, is added to the model's layers until exit (backward included)."""
        def hook_for(d: torch.Tensor):
            return lambda module, args, output: output + m * F.linear(args[0], d)
        handles = [module.register_forward_hook(hook_for(d)) for module, d in decoy]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class DecoyPartners(Decoys):
    """Fixed decoys: released updates (another task's, or a --shuffle_classes run of this one), one drawn a step."""

    def __init__(self, net: nn.Module, deltas: list[dict[str, torch.Tensor]], scale: Sequence[float]):
        """`deltas`: one {base parameter name: ΔW} per decoy, named as releases name them (PEFT's wrapping of
        `net`, if any, is looked through)."""
        super().__init__(scale)
        if not deltas:
            raise ValueError("DecoyPartners needs at least one decoy update")
        self.decoys: list[list[tuple[nn.Module, torch.Tensor]]] = []
        for delta in deltas:
            layers = []
            for name, d in sorted(delta.items()):
                module, weight = _linear_layer(net, name)
                if tuple(d.shape) != tuple(weight.shape):
                    raise ValueError(f"decoy {name} has shape {tuple(d.shape)}, the model's weight {tuple(weight.shape)}")
                if not torch.isfinite(d).all():
                    raise ValueError(f"decoy {name} holds non-finite values")
                layers.append((module, d.to(weight.device, weight.dtype)))
            self.decoys.append(layers)

    def draw(self, generator: torch.Generator) -> tuple[list[tuple[nn.Module, torch.Tensor]], float]:
        index = int(torch.randint(len(self.decoys), (1,), generator=generator))
        return self.decoys[index], self._multiplier(generator)


class RandomDecoys(Decoys):
    """A fresh random decoy every step, made from the task alone: per layer D = G R V_pᵀ, G ~ N(0, 1)^(out × p)
    and R ~ N(0, 1)^(p × p), V_p the p strongest directions of the layer's inputs (on the task's training images,
    at the base), scaled to ‖D‖_F = that layer's ‖ΔW‖_F in a reference update (the task's own unprotected one).
    Such a D rewrites what the task's features read, as a partner's update does, where isotropic noise of that
    size does not; R spreads its singular values, so it leans on a few directions as a trained update does
    (G V_pᵀ alone, nearly flat, did less: docs/experiments.md); drawn afresh, no fixed handful of decoys can be
    learnt around."""

    def __init__(self, net: nn.Module, input_grams: dict[str, torch.Tensor], norms: dict[str, float],
                 scale: Sequence[float], directions: int):
        """`input_grams`: {base weight name: XᵀX of the layer's inputs}; `norms`: {base weight name: ‖ΔW‖_F}."""
        super().__init__(scale)
        if set(input_grams) != set(norms) or not norms:
            raise ValueError(f"RandomDecoys needs an input Gram and a norm for the same layers, got "
                             f"{sorted(input_grams)} and {sorted(norms)}")
        self.layers: list[tuple[nn.Module, torch.Tensor, float, torch.Tensor]] = []  # module, V_p, norm, its weight
        for name in sorted(norms):
            module, weight = _linear_layer(net, name)
            if not (math.isfinite(norms[name]) and norms[name] >= 0):
                raise ValueError(f"decoy norm of {name} must be finite and >= 0, got {norms[name]}")
            _, vectors = torch.linalg.eigh(input_grams[name].double())  # ascending eigenvalues
            self.layers.append((module, vectors[:, -directions:].float(), float(norms[name]), weight))

    def draw(self, generator: torch.Generator) -> tuple[list[tuple[nn.Module, torch.Tensor]], float]:
        decoy = []
        for module, basis, norm, weight in self.layers:
            k = basis.shape[1]
            d = torch.randn(weight.shape[0], k, generator=generator) @ torch.randn(k, k, generator=generator) @ basis.T
            decoy.append((module, (d * (norm / d.norm())).to(weight.device, weight.dtype)))
        return decoy, self._multiplier(generator)


def check_decoy_scale(scale: Sequence[float]) -> None:
    """The one check of a decoy range [lo, hi] (the config's, at parse time, and Decoys')."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"--decoy_scale must be two numbers 0 < lo <= hi, got {list(scale)}")


def _linear_layer(net: nn.Module, weight_name: str) -> tuple[nn.Module, torch.Tensor]:
    """The linear layer of `net` that holds base weight `weight_name` (under PEFT, its LoRA wrapper), and that
    weight."""
    path = weight_name.removesuffix(".weight")
    for candidate in (f"base_model.model.{path}", path):
        try:
            module = net.get_submodule(candidate)
        except AttributeError:
            continue
        inner = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(inner, nn.Linear):
            raise ValueError(f"decoy weight {weight_name} belongs to a {type(inner).__name__}; decoys act on linear "
                             f"layers only")
        return module, inner.weight
    raise ValueError(f"decoy weight {weight_name} names no layer of this model: was the decoy trained on this base?")


LossFn = Callable[[Callable[..., object], object], torch.Tensor]
"""loss_fn(model, batch) -> the loss of each example, a 1-D tensor (a causal LM's examples are its answer
tokens); called with the update at s = 1, then re-scaled. The objective owns every reduction and the cap."""


class Trap2Objective:
    """Accumulates the gradient of J for one batch: a nominal pass, then K off-nominal passes.

    Each pass is back-propagated on its own (memory of one pass at a time); the caller clips and
    steps. λ = 0 is the unprotected baseline and runs the very same code without the off-nominal
    passes (their weight would be zero).
    """

    def __init__(self, lambda_reg: float, sampler: ScaleSampler | None = None, weight: str = "inv",
                 samples_per_step: int = 1, fixed_scales: Sequence[float] | None = None, seed: int = 0,
                 off_loss_cap: float | None = None, lambda_ramp_steps: int = 0):
        if lambda_reg < 0:
            raise ValueError(f"lambda_reg must be >= 0, got {lambda_reg}")
        if weight not in SCALE_WEIGHTS:
            raise ValueError(f"unknown scale weight {weight!r}; choose one of {sorted(SCALE_WEIGHTS)}")
        if samples_per_step < 1:
            raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}")
        if off_loss_cap is not None and not off_loss_cap > 0:
            raise ValueError(f"off_loss_cap must be > 0 (or None for the paper's unbounded term), got {off_loss_cap}")
        if lambda_ramp_steps < 0:
            raise ValueError(f"lambda_ramp_steps must be >= 0, got {lambda_ramp_steps}")
        if fixed_scales is not None and any(s <= 0 for s in fixed_scales):
            raise ValueError(f"fixed scales must be > 0, got {list(fixed_scales)}")
        self.lambda_reg = lambda_reg
        self.sampler = sampler or ScaleSampler()
        self.weight_name = weight
        self.weight = SCALE_WEIGHTS[weight]
        self.samples_per_step = samples_per_step
        self.fixed_scales = list(fixed_scales) if fixed_scales else None
        self.off_loss_cap = off_loss_cap
        self.lambda_ramp_steps = lambda_ramp_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.dropout_replay: DropoutReplay | None = None
        self.decoys: Decoys | None = None
        self.decoy_lambda = 0.0

    def replay_dropout(self, model: nn.Module) -> None:
        """Off-nominal passes reuse the nominal pass's dropout masks instead of redrawing them (the
        same masks, drawn once). Not with gradient checkpointing: recomputation calls dropout again."""
        self.dropout_replay = DropoutReplay(model)

    def attach_decoys(self, decoys: Decoys, decoy_lambda: float) -> None:
        """Each protected step adds one more pass, with a decoy partner beside the update (Decoys),
        whose loss, capped like the off-scale one, is pushed up with weight decoy_lambda."""
        if not (self.protects and decoy_lambda > 0):
            raise ValueError(f"decoys act only with lambda_reg > 0 and decoy_lambda > 0, got {self.lambda_reg} "
                             f"and {decoy_lambda}")
        self.decoys, self.decoy_lambda = decoys, decoy_lambda

    @staticmethod
    def _per_example(losses: torch.Tensor) -> torch.Tensor:
        if losses.dim() != 1:
            raise ValueError(f"loss_fn must return one loss per example (a 1-D tensor), got shape "
                             f"{tuple(losses.shape)}: the objective reduces and caps them itself")
        return losses

    def _off_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """Mean off-scale loss; with a cap, an example already broken past it stops pulling (the
        paper's term is unbounded, so late in training it keeps pushing broken examples further)."""
        losses = self._per_example(losses)
        return (losses if self.off_loss_cap is None else losses.clamp(max=self.off_loss_cap)).mean()

    @property
    def protects(self) -> bool:
        return self.lambda_reg > 0

    def ramp(self, step: int) -> float:
        """The share of λ and λ_d in force at optimiser step `step` (0-based): rising linearly to 1 over the
        first lambda_ramp_steps steps, so the task is fitted before the traps pull against it."""
        return 1.0 if self.lambda_ramp_steps == 0 else min(1.0, (step + 1) / self.lambda_ramp_steps)

    def scales_for_step(self) -> list[float]:
        if self.fixed_scales is not None:
            return list(self.fixed_scales)
        return self.sampler.sample(self.samples_per_step, self.generator)

    def backward(self, model: nn.Module, update: ScaledUpdate, loss_fn: LossFn, batch: object,
                 scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
                 autocast: Callable[[], ContextManager] = nullcontext, step: int = 0) -> dict[str, float]:
        """Back-propagates J on `batch` into the update's .grad and returns the pass losses.

        `scale_loss` is the AMP grad scaler's `scale` (identity without AMP); `step` the optimiser step (the ramp).
        """
        device = next(iter(update.params.values())).device
        replay = self.dropout_replay if self.protects else None
        rng = RngSnapshot(device)
        with replay.recording() if replay else nullcontext():
            with autocast():
                nominal = self._per_example(loss_fn(model, batch)).mean()
            scale_loss(nominal).backward()
        metrics = {"loss": float(nominal.detach())}
        if not self.protects:
            return metrics
        after_nominal = RngSnapshot(device) if replay else None
        scales = self.scales_for_step()
        share = self.ramp(step)
        lambda_reg, decoy_lambda = self.lambda_reg * share, self.decoy_lambda * share
        off_losses = []
        for s in scales:
            rng.restore()
            with update.rescaled(model, s), replay.replaying() if replay else nullcontext():
                with autocast():
                    off = self._off_loss(loss_fn(model, batch))
                term = -lambda_reg * self.weight(s) * off / len(scales)
                scale_loss(term).backward()  # inside: checkpointed layers recompute with the scaled weights
            off_losses.append(float(off.detach()))
        decoy_loss = 0.0
        if self.decoys is not None:
            decoy_layers, m = self.decoys.draw(self.generator)
            rng.restore()
            with self.decoys.added(decoy_layers, m), replay.replaying() if replay else nullcontext():
                with autocast():
                    decoy = self._off_loss(loss_fn(model, batch))
                scale_loss(-decoy_lambda * decoy).backward()
            decoy_loss = float(decoy.detach())
            metrics["loss_decoy"] = decoy_loss
        if replay:  # replayed passes drew no masks: continue the stream where the nominal pass left it
            after_nominal.restore()
            replay.clear()
        metrics["loss_off"] = sum(off_losses) / len(off_losses)
        metrics["scale"] = scales[0] if len(scales) == 1 else sum(scales) / len(scales)
        metrics["objective"] = metrics["loss"] - lambda_reg * sum(
            self.weight(s) * l for s, l in zip(scales, off_losses)) / len(scales) - decoy_lambda * decoy_loss
        return metrics
