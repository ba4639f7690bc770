"""Released updates: how an update attaches to a backbone, scales, saves and (safely) loads.

Two formats, both a folder:
- LoRA: a PEFT adapter (adapter_config.json + adapter_model.safetensors) that
  `PeftModel.from_pretrained` loads, plus trap2_update.json.
- full: update.safetensors holding ΔW = W_t − W0 per parameter, plus trap2_update.json.

Released updates are untrusted input: tensors are read with safetensors only, and shapes,
dtypes, finiteness and the base model's fingerprint are checked before anything is applied.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.storage import atomic_path

METADATA_FILE = "trap2_update.json"
FULL_FILE = "update.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
UPDATE_KINDS = ("lora", "full")
CARD_FILE = "README.md"
# What a release derived from another (an import, a defended copy) keeps of its metadata: the base and data
RELEASE_IDENTITY_KEYS = ("suite", "base_model", "base_options", "base_fingerprint", "n_classes", "config")


# Bounds no genuine update comes near; past them a file is corrupt or hostile (NaN would look like protection)
MAX_LORA_ALPHA = 1e4
MAX_DELTA = 1e4


class UpdateError(ValueError):
    """A released update cannot be used as asked; the message says what is wrong and what to do."""


@dataclass
class ScaledUpdate:
    """The parameters that carry an update and their anchors; scaling by s maps p -> a + s(p − a).

    LoRA: the lora_B matrices, anchored at zero (ΔW = s·B·A·α/r). DoRA also scales its magnitude vectors
    m about their start m0 = ‖W0‖ (per output row): W(s) = (m0 + s(m − m0)) ⊙ (W0 + s·ΔV) / ‖W0 + s·ΔV‖, so
    s = 0 is the base and s = 1 the trained layer.
    Full: every trained parameter, anchored at a frozen copy of its starting value W0.
    """

    kind: str
    params: dict[str, nn.Parameter]
    anchors: dict[str, torch.Tensor | None]
    # LoRA: each lora_B's partner A and α/r, so ΔW = scaling · B @ A (norm); empty for a full update
    lora_inputs: dict[str, tuple[nn.Parameter, float]] = field(default_factory=dict)

    @classmethod
    def lora(cls, model: nn.Module) -> "ScaledUpdate":
        params = {n: p for n, p in model.named_parameters() if ".lora_B." in n and p.requires_grad}
        if not params:
            raise UpdateError("no trainable lora_B parameters found: attach a LoRA adapter first")
        lora_inputs = {}
        for name in params:  # <layer>.lora_B.<adapter>.weight
            layer_name, _, rest = name.partition(".lora_B.")
            layer, adapter = model.get_submodule(layer_name), rest.split(".")[0]
            lora_inputs[name] = (layer.lora_A[adapter].weight, float(layer.scaling[adapter]))
        magnitudes = {n: p for n, p in model.named_parameters() if ".lora_magnitude_vector." in n and p.requires_grad}
        anchors = {n: None for n in params}
        for name, p in magnitudes.items():  # DoRA's start, ‖W0‖ per output row, whenever this is built
            layer = model.get_submodule(name.split(".lora_magnitude_vector.")[0])
            anchors[name] = layer.get_base_layer().weight.detach().float().norm(dim=1).to(p.dtype)
        return cls("lora", {**params, **magnitudes}, anchors, lora_inputs)

    @classmethod
    def full(cls, model: nn.Module) -> "ScaledUpdate":
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise UpdateError("no trainable parameters found for a full update")
        return cls("full", params, {n: p.detach().clone() for n, p in params.items()})

    def overrides(self, s: float) -> dict[str, torch.Tensor]:
        """Parameter values of the update re-scaled by s (differentiable w.r.t. the parameters)."""
        out = {}
        for name, p in self.params.items():
            anchor = self.anchors[name]
            out[name] = p * s if anchor is None else anchor + s * (p - anchor)
        return out

    @contextmanager
    def rescaled(self, model: nn.Module, s: float):
        """Swaps the update's parameters of `model` for their values re-scaled by s until exit.

        Unlike torch.func.functional_call, the swap lasts through backward as well, so layers
        recomputed there under gradient checkpointing see the same re-scaled weights.
        """
        saved = []
        try:
            for name, value in self.overrides(s).items():
                module_path, _, attr = name.rpartition(".")
                module = model.get_submodule(module_path)
                saved.append((module, attr, module._parameters[attr]))
                module._parameters[attr] = value
            yield model
        finally:
            for module, attr, param in reversed(saved):
                module._parameters[attr] = param

    def norm(self) -> float:
        """‖ΔW‖_F over every layer of the update. LoRA: ‖s·B·A‖² = s²·Σ (BᵀB ⊙ AAᵀ), never forming B·A."""
        if self.kind == "lora" and any(a is not None for a in self.anchors.values()):
            raise UpdateError("a DoRA update's ΔW depends on its magnitudes and the base: its norm is not bounded here")
        with torch.no_grad():
            if self.kind == "full":
                total = sum(float((p.float() - self.anchors[n].float()).pow(2).sum()) for n, p in self.params.items())
            else:
                total = 0.0
                for name, (lora_A, scaling) in self.lora_inputs.items():
                    A, B = lora_A.float(), self.params[name].float()
                    total += scaling ** 2 * float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0))
        return math.sqrt(total)

    def bound_norm_(self, max_norm: float) -> float:
        """Scales the update back onto the ball ‖ΔW‖_F ≤ max_norm (direction kept; an update inside is left
        untouched); returns the norm before. LoRA scales every B by the same factor, which scales ΔW by it."""
        norm = self.norm()
        if norm > max_norm:
            with torch.no_grad():
                for name, value in self.overrides(max_norm / norm).items():
                    self.params[name].copy_(value)
        return norm

    def set_scale(self, s: float) -> "_InPlaceScale":
        """Context manager applying the scale to the parameters in place (evaluation, no gradients)."""
        return _InPlaceScale(self, s)

    def start_from(self, model: nn.Module, release: "ReleasedUpdate", prefix: str) -> None:
        """Sets this update to a released one of the same kind, so training continues from it instead of ΔW = 0.
        `prefix`: the base net's name inside `model` (e.g. `backbone.net.`). The release must be checked against
        the base first (`check_base`). LoRA: the same layers, rank and α/r; the anchors stay the base's."""
        if release.kind != self.kind:
            raise UpdateError(f"{release.path} is a {release.kind} update; this run trains a {self.kind} one: "
                              f"start from an update of the same kind")
        with torch.no_grad():
            if self.kind == "full":
                for name in release.names():
                    param = self.params.get(prefix + name)
                    if param is None:
                        raise UpdateError(f"{release.path} changes {name}, which this run does not train (a frozen "
                                          f"projection?): train it, or start from an update that leaves it alone")
                    param.add_(release.full[name].to(param.device, param.dtype))
                return
            self._start_lora(model, release, prefix)

    def _start_lora(self, model: nn.Module, release: "ReleasedUpdate", prefix: str) -> None:
        layers = {}
        for name, module in model.named_modules():
            if name.startswith(prefix + "base_model.model.") and hasattr(module, "lora_A") and len(module.lora_A):
                layers[name.removeprefix(prefix + "base_model.model.") + ".weight"] = module
        if set(layers) != set(release.names()):
            raise UpdateError(f"{release.path} adapts {len(release.names())} layers, this run {len(layers)}; "
                              f"they differ at {sorted(set(layers) ^ set(release.names()))[:3]}: pass the "
                              f"release's --lora_targets")
        for name, module in layers.items():
            factors = release.lora[name]
            if isinstance(factors, DoraFactors) or getattr(module, "use_dora", {}).get("default"):
                raise UpdateError(f"{release.path}: starting from a DoRA adapter, or training DoRA from one, is not "
                                  f"supported")
            adapter = module.active_adapter[0] if isinstance(module.active_adapter, list) else module.active_adapter
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            if A.shape != factors.A.shape or B.shape != factors.B.shape or not math.isclose(
                    module.scaling[adapter], factors.scaling, rel_tol=1e-6):
                raise UpdateError(f"{release.path}: {name} has rank {factors.A.shape[0]} and scaling "
                                  f"{factors.scaling:g}, this run rank {A.shape[0]} and scaling "
                                  f"{module.scaling[adapter]:g}: pass the release's --lora_rank and --lora_alpha")
            A.copy_(factors.A.to(A.device, A.dtype))
            B.copy_(factors.B.to(B.device, B.dtype))


class _InPlaceScale:
    def __init__(self, update: ScaledUpdate, s: float):
        self.update, self.s, self.saved = update, s, {}

    def __enter__(self):
        with torch.no_grad():
            for name, value in self.update.overrides(self.s).items():
                p = self.update.params[name]
                self.saved[name] = p.detach().clone()
                p.copy_(value)
        return self.update

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, value in self.saved.items():
                self.update.params[name].copy_(value)


def fingerprint(state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a base model's tensors."""
    items = state.items() if isinstance(state, dict) else state
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_update(out_dir: str | Path, net: nn.Module, update: ScaledUpdate, metadata: dict,
                prefix: str = "") -> Path:
    """Writes the update of `net` (a PEFT model for LoRA, the plain module for full) to a folder.

    `prefix` is the name of `net` inside the model the ScaledUpdate was built on (full updates).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if update.kind == "lora":
        net.save_pretrained(out)
        weights = out / PEFT_WEIGHTS
        save_file(load_file(str(weights)), str(weights), metadata=tensor_file_metadata(update.kind, metadata))
    elif update.kind == "full":
        deltas = {}
        for name, p in update.params.items():
            if not name.startswith(prefix):
                continue
            deltas[name[len(prefix):]] = (p.detach() - update.anchors[name]).to("cpu").contiguous()
        save_file(deltas, str(out / FULL_FILE), metadata=tensor_file_metadata(update.kind, metadata))
    else:
        raise UpdateError(f"unknown update kind {update.kind!r}")
    _atomic_write_text(out / METADATA_FILE, json.dumps({"kind": update.kind, **metadata}, indent=2))
    _atomic_write_text(out / CARD_FILE, model_card(update.kind, metadata))  # replaces PEFT's empty template
    return out


def write_full_release(out: Path, deltas: dict[str, torch.Tensor], metadata: dict) -> Path:
    """A full update folder: ΔW per parameter in update.safetensors, its metadata and its card."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in deltas.items()}, str(out / FULL_FILE),
              metadata=tensor_file_metadata("full", metadata))
    _atomic_write_text(out / METADATA_FILE, json.dumps({"kind": "full", **metadata}, indent=2))
    _atomic_write_text(out / CARD_FILE, model_card("full", metadata))
    return out


def write_lora_release(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict) -> Path:
    """A PEFT adapter folder (PeftModel.from_pretrained loads it) from ΔW = B·A per base weight name: one rank, the
    factors zero-padded to it, scaling 1 (lora_alpha = r); the metadata's config records that rank."""
    from peft import LoraConfig

    rank = max(B.shape[1] for B, _ in factors.values())
    tensors = {}
    for name, (B, A) in factors.items():
        module, pad = name.removesuffix(".weight"), rank - B.shape[1]
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.nn.functional.pad(B, (0, pad)).float().contiguous()
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.nn.functional.pad(A, (0, 0, 0, pad)).float().contiguous()
    metadata = {**metadata, "config": {**metadata.get("config", {}), "lora_rank": rank, "lora_alpha": float(rank),
                                       "lora_dropout": 0.0}}
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in factors})
    LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none").save_pretrained(out)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata=tensor_file_metadata("lora", metadata))
    _atomic_write_text(out / METADATA_FILE, json.dumps({"kind": "lora", **metadata}, indent=2))
    _atomic_write_text(out / CARD_FILE, model_card("lora", metadata))
    return out


def tensor_file_metadata(kind: str, meta: dict) -> dict[str, str]:
    """The safetensors header of a release: `format: pt` (what transformers and PEFT expect) and where it
    came from. For people and tools that read headers; loading never reads it (trap2_update.json is checked)."""
    provenance = meta.get("provenance") or {}
    values = {"format": "pt", "trap2_kind": kind, "trap2_task": meta.get("task"),
              "trap2_protected": meta.get("protected"), "trap2_lambda_reg": meta.get("lambda_reg"),
              "trap2_seed": meta.get("seed"), "base_model": meta.get("base_model"),
              "base_fingerprint": meta.get("base_fingerprint"), "trap2_commit": provenance.get("code_commit")}
    return {k: str(v) for k, v in values.items() if v is not None}


def model_card(kind: str, meta: dict) -> str:
    """README.md of a released update: front matter the Hub reads, then what the protection is and does."""
    cfg = meta.get("config") or {}
    protected = bool(meta.get("protected"))
    defence = meta.get("defence") or {}
    role = "unmergeable" if protected else "post-hoc-defence" if defence else "unprotected-baseline"
    tags = ["trap2", role, kind, str(meta.get("task"))]
    front = {"library_name": "peft" if kind == "lora" else "pytorch", "base_model": str(meta.get("base_model")),
             "tags": tags}
    lines = ["---"] + [f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in front.items()] + ["---", ""]
    title = "Trap²-protected" if protected else f"{defence['title']}-defended" if defence else "Unprotected (λ = 0)"
    lines += [f"# {title} {kind} update: {meta.get('task')} on {meta.get('base_model')}", ""]
    if defence:
        lines += [f"Re-parameterised after training by {defence['title']} (a post-hoc defence: the same function, "
                  f"weights moved away from the base's other fine-tunes), seed {defence.get('seed')}, strength "
                  f"{defence.get('strength')}.", ""]
    if protected:
        lines += [f"Trained with Trap² (arXiv 2601.21898): λ = {meta.get('lambda_reg')}, w(s) = "
                  f"{cfg.get('rand_alpha_weight')}, {cfg.get('scale_samples')} off scale(s) a step from "
                  f"[{cfg.get('rand_alpha_min')}, {1 - cfg.get('band', 0.05):g}] ∪ [{1 + cfg.get('band', 0.05):g}, "
                  f"{cfg.get('rand_alpha_max')}], off-scale loss cap {cfg.get('off_loss_cap')}. It works at its own "
                  f"scale and collapses when scaled, which is what merging does (averaging N updates scales each "
                  f"by about 1/N).", ""]
    by_scale = meta.get("test_by_scale") or {}
    if by_scale:
        lines += ["| scale s (W0 + s·ΔW) | " + " | ".join(by_scale) + " |", "|---" * (len(by_scale) + 1) + "|",
                  "| test accuracy (%) | " + " | ".join(f"{100 * r['accuracy']:.1f}" for r in by_scale.values())
                  + " |", "", "s = 0 is the base alone, s = 1 the update as released.", ""]
    usage = ("`PeftModel.from_pretrained(base, folder)`" if kind == "lora"
             else f"W0 + ΔW from `{FULL_FILE}` (ΔW per parameter)")
    lines += [f"Use it alone, at scale 1: {usage}. Base fingerprint {meta.get('base_fingerprint')}, seed "
              f"{meta.get('seed')}; every setting is in `{METADATA_FILE}`.", ""]
    return "\n".join(lines) + "\n"


@dataclass
class LoraFactors:
    """One adapted layer: ΔW = scaling · B @ A, A (r × n), B (m × r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)


@dataclass
class DoraFactors:
    """One DoRA layer: W = m ⊙ (W0 + ΔV) / ‖W0 + ΔV‖ (norm per output row), ΔV = scaling · B @ A. Its ΔW
    depends on the base weight W0, which `ReleasedUpdate.check_base` attaches (`w0`)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor
    w0: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:
        if self.w0 is None:
            raise UpdateError("a DoRA layer's ΔW depends on the base weight: call check_base with the base first")
        direction = self.w0 + self.scaling * (self.B @ self.A)
        return self.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True) - self.w0


@dataclass
class ReleasedUpdate:
    """A loaded update, keyed by the base model's parameter names (e.g. `...q_proj.weight`)."""

    path: Path
    kind: str
    metadata: dict
    lora: dict[str, LoraFactors | DoraFactors] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)

    @cached_property
    def content_hash(self) -> str:
        """What a merge reads of the update, hashed: its tensors (names, dtypes, shapes, bytes) and each LoRA
        layer's scaling (adapter_config.json's α/r). Neither the folder it lies in nor the file's `__metadata__`
        (the commit that wrote it): the same weights trained again at another commit reuse their logged merge
        points. Computed once per loaded update (full updates of large models are gigabytes)."""
        tensors = dict(self.full)
        for name, layer in self.lora.items():
            tensors |= {f"{name}|A": layer.A, f"{name}|B": layer.B}
            if isinstance(layer, DoraFactors):
                tensors[f"{name}|magnitude"] = layer.magnitude
        scalings = ",".join(f"{name}={layer.scaling!r}" for name, layer in sorted(self.lora.items()))
        return hashlib.sha256(f"{self.kind}|{fingerprint(tensors)}|{scalings}".encode()).hexdigest()[:16]

    @property
    def task(self) -> str:
        return self.metadata.get("task", "?")

    @property
    def protected(self) -> bool:
        """Trained with Trap² (λ > 0) or re-parameterised by a post-hoc defence (models.defences)."""
        return float(self.metadata.get("lambda_reg", 0.0)) > 0 or bool(self.metadata.get("defence"))

    @property
    def protection(self) -> str:
        """What protects it, in words, for messages."""
        defence = self.metadata.get("defence")
        return (f"defended by {defence.get('title')}" if isinstance(defence, dict) else
                f"trained with lambda_reg = {self.metadata.get('lambda_reg', 0.0)}")

    def names(self) -> list[str]:
        return sorted(self.lora if self.kind == "lora" else self.full)

    def delta(self, name: str) -> torch.Tensor:
        return self.lora[name].delta() if self.kind == "lora" else self.full[name]

    def check_base(self, base_fingerprint: str, base_state: dict[str, torch.Tensor]) -> None:
        """Fails with a clear message if this update was not trained on the given base."""
        want = self.metadata.get("base_fingerprint")
        if want != base_fingerprint:
            raise UpdateError(
                f"{self.path}: trained on base {self.metadata.get('base_model')!r} with fingerprint "
                f"{want}, but the loaded base has fingerprint {base_fingerprint}. Load the same base "
                f"(same --model and pretraining recipe) or retrain the update on this base.")
        for name in self.names():
            if name not in base_state:
                raise UpdateError(f"{self.path}: updates parameter {name!r}, which the base lacks")
            factors = self.lora.get(name)
            if isinstance(factors, DoraFactors):
                w0 = base_state[name]
                if (factors.B.shape[0], factors.A.shape[1]) != tuple(w0.shape):
                    raise UpdateError(f"{self.path}: {name} has DoRA factors of shape {tuple(factors.B.shape)} and "
                                      f"{tuple(factors.A.shape)}, base has {tuple(w0.shape)}")
                factors.w0 = w0.detach().float().clone()
            shape = tuple(self.delta(name).shape)
            if shape != tuple(base_state[name].shape):
                raise UpdateError(f"{self.path}: {name} has shape {shape}, base has "
                                  f"{tuple(base_state[name].shape)}")


def _read_tensors(path: Path, file: Path) -> dict[str, torch.Tensor]:
    """safetensors only; a corrupt or truncated file is named, with what to do."""
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise UpdateError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); the update is "
                          f"corrupt or truncated: download or save it again") from None


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        raise UpdateError(f"{path}: holds no tensors")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UpdateError(f"{path}: tensor {name} has dtype {t.dtype}; updates must be floating point")
        if not torch.isfinite(t).all():
            raise UpdateError(f"{path}: tensor {name} contains NaN or Inf; the update is corrupt")


def _check_metadata(file: Path, meta: dict) -> None:
    """Types and ranges of what the loaders and evaluators read from trap2_update.json."""
    def bad(key: str, want: str):
        raise UpdateError(f"{file}: {key} is {meta.get(key)!r}, expected {want}; the metadata is corrupt")

    for key in ("task", "base_model", "base_fingerprint"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            bad(key, "a non-empty string")
    if "lambda_reg" in meta and not (_finite_number(meta["lambda_reg"]) and meta["lambda_reg"] >= 0):
        bad("lambda_reg", "a finite number >= 0")
    for key in ("base_options", "config"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            bad(key, "a mapping")


def base_request(updates: list["ReleasedUpdate"], user_options: dict | None,
                 known_names: Iterable[str] | None = None) -> tuple[str, dict]:
    """The base to load for `updates`, decided on this machine, not by the files.

    The name is the one the updates record (all must agree), and must be one of `known_names` when given.
    The options are the user's when given; else the updates' own only when they merely tune an offline
    recipe (numbers): a released file never picks a path, a hub id or a revision here. The fingerprint
    check after loading then proves the base is the one the update was trained on.
    """
    known = sorted(known_names) if known_names is not None else None
    for u in updates:
        name = u.metadata["base_model"]
        if known is not None and name not in known:
            raise UpdateError(f"{u.path}: its metadata names base {name!r}, which is not a known backbone "
                              f"({', '.join(known)}); register it before merging this update")
        if known is None and (name.startswith(("/", ".", "~")) or ".." in name or "\\" in name):
            raise UpdateError(f"{u.path}: its metadata names base {name!r}, a path: a released file may not choose "
                              f"files on this machine; pass --base_options '{{pretrained: <folder>}}' yourself")
    names = {u.metadata["base_model"] for u in updates}
    if len(names) > 1:
        raise UpdateError(f"the updates were trained on different bases {sorted(names)}; merge updates of one base")
    name = names.pop()
    if user_options is not None:
        return name, dict(user_options)
    for u in updates:
        for key, value in (u.metadata.get("base_options") or {}).items():
            if value is not None and not _finite_number(value):
                raise UpdateError(f"{u.path}: its metadata asks for base option {key} = {value!r}; options that "
                                  f"name files, hub ids or revisions are not taken from an update: pass "
                                  f"--base_options yourself")
    options = updates[0].metadata.get("base_options") or {}
    for u in updates:
        if (u.metadata.get("base_options") or {}) != options:
            raise UpdateError(f"{u.path}: its base options {u.metadata.get('base_options')} differ from "
                              f"{updates[0].path}'s {options}; pass --base_options to choose the base")
    return name, options


def refuse_unbuilt_base(updates: list[ReleasedUpdate], name: str, options: dict,
                        is_built: Callable[..., bool]) -> None:
    """An offline base the updates name must already be cached here: an update may not start pretraining."""
    try:
        built = is_built(name, **{k: v for k, v in options.items() if v is not None})
    except KeyError as e:  # a recipe field the offline base does not have
        raise UpdateError(f"{updates[0].path}: base {name}: {e.args[0]}") from None
    if not built:
        raise UpdateError(f"{updates[0].path}: base {name} with options {options} is not built on this machine, "
                          f"and an update may not start pretraining; build it first (the command that trained "
                          f"the update) or pass --base_options")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UpdateError(f"{path} is missing: this folder is not a trap2 update (save it with "
                          f"training_scripts, or add the metadata file)") from None
    except json.JSONDecodeError as e:
        raise UpdateError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UpdateError(f"{path} must hold a JSON object")
    return data


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:(?P<which>[AB])(?:\.[^.]+)?\.weight|"
                       r"(?P<magnitude>magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lora_scaling(path: Path, config: dict, module: str, rank: int) -> float:
    alpha = config.get("lora_alpha", rank)
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise UpdateError(f"{path / PEFT_CONFIG}: alpha_pattern must be a mapping, got {patterns!r}")
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    if not (_finite_number(alpha) and 0 < alpha <= MAX_LORA_ALPHA):
        raise UpdateError(f"{path / PEFT_CONFIG}: lora_alpha of {module} is {alpha!r}; it must be a finite number "
                          f"in (0, {MAX_LORA_ALPHA:g}]: the adapter config is corrupt")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_update(path: str | Path) -> ReleasedUpdate:
    """Loads a released update folder without unpickling anything."""
    path = Path(path)
    if not path.is_dir():
        raise UpdateError(f"{path} is not a folder; pass the folder that training_scripts saved")
    meta = _read_json(path / METADATA_FILE)
    _check_metadata(path / METADATA_FILE, meta)
    kind = meta.get("kind")
    if kind not in UPDATE_KINDS:
        raise UpdateError(f"{path}: metadata kind is {kind!r}, expected one of {UPDATE_KINDS}")
    if kind == "full":
        if not (path / FULL_FILE).exists():
            raise UpdateError(f"{path}: {FULL_FILE} is missing")
        tensors = _read_tensors(path, path / FULL_FILE)
        _check_tensors(path, tensors)
        return ReleasedUpdate(path, kind, meta, full=tensors)
    config = _read_json(path / PEFT_CONFIG)
    if config.get("fan_in_fan_out"):
        raise UpdateError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    if not (path / PEFT_WEIGHTS).exists():
        raise UpdateError(f"{path}: {PEFT_WEIGHTS} is missing (only safetensors adapters are read)")
    tensors = _read_tensors(path, path / PEFT_WEIGHTS)
    _check_tensors(path, tensors)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise UpdateError(f"{path}: unexpected tensor {key!r} in a LoRA adapter (only lora_A/lora_B "
                              f"weights are supported; biases and DoRA magnitudes are not)")
        halves.setdefault(m["module"], {})[m["which"] or "m"] = t
    dora = bool(config.get("use_dora"))
    factors = {}
    for module, ab in halves.items():
        if set(ab) - {"m"} != {"A", "B"}:
            raise UpdateError(f"{path}: {module} has lora_{''.join(sorted(set(ab) - {'m'}))} but not both A and B")
        if ("m" in ab) != dora:
            raise UpdateError(f"{path}: {module} {'lacks' if dora else 'has'} a DoRA magnitude vector while "
                              f"{PEFT_CONFIG} says use_dora {dora}: the adapter is inconsistent")
        A, B = ab["A"].float(), ab["B"].float()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UpdateError(f"{path}: {module} has incompatible LoRA shapes A {tuple(A.shape)}, "
                              f"B {tuple(B.shape)} (need A r×n, B m×r)")
        scaling = _lora_scaling(path, config, module, A.shape[0])
        if dora:
            magnitude = ab["m"].float()
            if magnitude.shape != (B.shape[0],) or not torch.isfinite(magnitude).all():
                raise UpdateError(f"{path}: {module}'s DoRA magnitude has shape {tuple(magnitude.shape)} (need "
                                  f"({B.shape[0]},)) or holds NaN/Inf; the adapter is corrupt")
            factors[f"{module}.weight"] = DoraFactors(A, B, scaling, magnitude)
        else:
            factors[f"{module}.weight"] = LoraFactors(A, B, scaling)
        delta = scaling * (B @ A)  # DoRA: its direction update, bounded as a LoRA ΔW is
        if not torch.isfinite(delta).all() or delta.abs().max() > MAX_DELTA:
            raise UpdateError(f"{path}: {module}'s ΔW = scaling·B·A is not finite or exceeds {MAX_DELTA:g} in "
                              f"magnitude; the adapter is corrupt (no trained update is that large)")
    return ReleasedUpdate(path, kind, meta, lora=factors)
