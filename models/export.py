"""Updates as complete models, for tools that load whole checkpoints (transformers' `from_pretrained`,
mergekit- or FusionBench-style mergers), and complete fine-tuned models back as our full updates.

Export writes W0 + ΔW of a release (LoRA or full) with the base's own `save_pretrained`. Import reads a
model folder's safetensors weights (never its code or pickles), checks every tensor against the base a
reference release of the same base names, and saves W − W0 as a full update with that release's data
settings, so our evaluator can merge it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.backbones import BACKBONES, Base, load_base
from models.pretrain import RECIPES, offline_base_is_built
from models.runtime import provenance
from models.updates import (RELEASE_IDENTITY_KEYS, ReleasedUpdate, UpdateError, base_request, load_update,
                            refuse_unbuilt_base, write_full_release)

MODEL_WEIGHTS = "model.safetensors"  # what save_pretrained writes for a model of this size
EXPORT_RECORD = "trap2_export.json"


def release_base(update: ReleasedUpdate, base_options: dict | None) -> Base:
    """The base of a release, loaded as the evaluator would (the release never picks files or recipes)."""
    name, options = base_request([update], base_options, BACKBONES)
    if base_options is None and name in RECIPES:
        refuse_unbuilt_base([update], name, options, offline_base_is_built)
    base = load_base(name, options)
    update.check_base(base.fingerprint, base.backbone.net.state_dict())
    return base


def _transformers_net(base: Base):
    from transformers import PreTrainedModel

    net = base.backbone.net
    if not isinstance(net, PreTrainedModel):
        raise UpdateError(f"base {base.name} is an {type(net).__name__}, not a transformers model: complete-model "
                          f"export and import cover transformers backbones (e.g. offline-vit, the HF CLIP towers)")
    return net


def export_model(update_folder: str | Path, out_dir: str | Path, base_options: dict | None = None) -> Path:
    """W0 + ΔW as a `from_pretrained` folder (config.json + model.safetensors) with a record of its source."""
    update = load_update(update_folder)
    base = release_base(update, base_options)
    net = _transformers_net(base)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in update.names():
            params[name].add_(update.delta(name).to(params[name].dtype))
    out = Path(out_dir)
    net.save_pretrained(out, safe_serialization=True)
    (out / EXPORT_RECORD).write_text(json.dumps({
        "source_update": str(update.path), "source_hash": update.content_hash, "kind": update.kind,
        "base_model": base.name, "base_fingerprint": base.fingerprint, "task": update.task,
        "protected": update.protected, "lambda_reg": update.metadata.get("lambda_reg")}, indent=2))
    return out


def import_model(model_folder: str | Path, like: str | Path, out_dir: str | Path, task: str | None = None,
                 lambda_reg: float = 0.0, base_options: dict | None = None) -> Path:
    """A complete fine-tuned model of the base that release `like` was trained on, saved as a full update
    (ΔW = W − W0 for every parameter that differs) with `like`'s data settings and the given task."""
    reference = load_update(like)
    base = release_base(reference, base_options)
    net = _transformers_net(base)
    weights = Path(model_folder) / MODEL_WEIGHTS
    if not weights.is_file():
        raise UpdateError(f"{model_folder} has no {MODEL_WEIGHTS}; save the model with save_pretrained(..., "
                          f"safe_serialization=True) as one file (sharded and pickled checkpoints are not read)")
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise UpdateError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    params = dict(net.named_parameters())
    missing, unknown = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(net.state_dict()))
    if missing or unknown:
        raise UpdateError(f"{weights} is not a model of base {base.name}: missing {missing[:5]}, unknown "
                          f"{unknown[:5]}; import a fine-tune of the base that {like} names")
    deltas = {}
    for name, w0 in params.items():
        t = tensors[name]
        if t.shape != w0.shape or not t.is_floating_point() or not torch.isfinite(t).all():
            raise UpdateError(f"{weights}: {name} has shape {tuple(t.shape)} and dtype {t.dtype} (base: "
                              f"{tuple(w0.shape)}, {w0.dtype}) or holds NaN/Inf; it is not a fine-tune of this base")
        delta = t.to(w0.dtype) - w0.detach()
        if delta.any():
            deltas[name] = delta.contiguous()
    if not deltas:
        raise UpdateError(f"{weights} equals the base: there is no update to import")
    metadata = {**{k: v for k, v in reference.metadata.items() if k in RELEASE_IDENTITY_KEYS},
                "task": task or reference.task, "protected": lambda_reg > 0, "lambda_reg": lambda_reg,
                "seed": None, "imported_from": str(model_folder), "provenance": provenance(base.fingerprint)}
    if task and task != reference.task:
        metadata.pop("n_classes", None)
    metadata["config"] = {**metadata.get("config", {}), "dataset": metadata["task"], "lambda_reg": lambda_reg,
                          "peft": "full"}
    return write_full_release(Path(out_dir), deltas, metadata)
