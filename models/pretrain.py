"""Pretraining of the offline bases on the disjoint pretext set, cached under data/bases/.

The cache key is a hash of the whole recipe (architecture, data, optimisation, seed), so a changed
recipe never reuses stale weights. `python -m models.pretrain` builds both bases ahead of time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dataset.offline import GENERATOR_VERSION, load_offline_task
from models.runtime import DETERMINISTIC_THREADS, pin_threads, run_cli
from models.schedules import warmup_times_cosine
from models.storage import atomic_path, cache_root

RECIPES: dict[str, dict] = {
    "offline-vit": dict(arch="hf-clip-vision", image_size=32, patch_size=8, hidden_size=128, intermediate_size=512,
                        num_hidden_layers=4, num_attention_heads=4, projection_dim=64, steps=3000, batch_size=64,
                        lr=1e-3, weight_decay=0.05, warmup=200, pretext_train=10000, seed=0),
    "offline-convnext": dict(arch="timm-convnext", image_size=32, depths=(1, 1, 2, 1), dims=(32, 64, 128, 256),
                             embed_dim=64, steps=2000, batch_size=64, lr=2e-3, weight_decay=0.05, warmup=200,
                             pretext_train=10000, seed=0),
}
OFFLINE_CONVNEXT = "convnext_trap2_offline"


def _register_offline_convnext(depths, dims) -> None:
    """Registers the tiny timm ConvNeXt variant so OpenCLIP's TimmModel can build it by name."""
    import timm
    from timm.models import register_model
    from timm.models.convnext import _create_convnext

    if OFFLINE_CONVNEXT in timm.list_models(OFFLINE_CONVNEXT):
        return

    @register_model
    def convnext_trap2_offline(pretrained=False, **kwargs):
        return _create_convnext(OFFLINE_CONVNEXT, pretrained=pretrained,
                                **{"depths": tuple(depths), "dims": tuple(dims), **kwargs})


def build_architecture(recipe: dict) -> nn.Module:
    """The randomly initialised network of a recipe (same classes as the full-scale paths)."""
    torch.manual_seed(recipe["seed"])
    if recipe["arch"] == "hf-clip-vision":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        keys = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "projection_dim")
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: recipe[k] for k in keys}))
    if recipe["arch"] == "timm-convnext":
        import logging

        from open_clip.timm_model import TimmModel

        _register_offline_convnext(recipe["depths"], recipe["dims"])
        logging.getLogger("timm").setLevel(logging.ERROR)  # "no pretrained config": expected, we pretrain
        return TimmModel(OFFLINE_CONVNEXT, embed_dim=recipe["embed_dim"], image_size=recipe["image_size"],
                         pool="avg", proj="linear")
    raise ValueError(f"unknown architecture {recipe['arch']!r}")


def recipe_for(name: str, **overrides) -> dict:
    if name not in RECIPES:
        raise KeyError(f"no offline recipe {name!r}; choose one of {sorted(RECIPES)}")
    unknown = set(overrides) - set(RECIPES[name])
    if unknown:
        raise KeyError(f"unknown recipe fields {sorted(unknown)} for {name}")
    return {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}, "data": GENERATOR_VERSION,
            "threads": DETERMINISTIC_THREADS}  # a base made under another thread count has other bits


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _features(net: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    return net(pixel_values=x).image_embeds if arch == "hf-clip-vision" else net(x)


def pretrain(recipe: dict, progress: bool = True) -> nn.Module:
    """Supervised pretraining on the pretext classes (shapes and gratings, none of the suite's tasks).

    On one intra-op thread, so the same recipe gives the same bits on any machine of the same CPU
    instruction set, whatever its core count."""
    pin_threads()
    net = build_architecture(recipe)
    data = load_offline_task("pretext", seed=recipe["seed"], sizes={"train": recipe["pretext_train"], "val": 500,
                                                                    "test": 10})
    x_all = data.images["train"].float().div(255).sub(0.5).div(0.5)
    y_all = data.labels["train"]
    with torch.no_grad():
        dim = _features(net, recipe["arch"], x_all[:2]).shape[-1]
    classifier = nn.Linear(dim, len(data.classes))
    params = list(net.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps, warmup = recipe["steps"], recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_times_cosine, warmup=warmup, total=steps))
    gen = torch.Generator().manual_seed(recipe["seed"])
    net.train()
    bar = tqdm(range(steps), desc=f"pretraining {recipe['arch']}", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(y_all), (recipe["batch_size"],), generator=gen)
        x = x_all[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(classifier(_features(net, recipe["arch"], x)), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        xv = data.images["val"].float().div(255).sub(0.5).div(0.5)
        acc = (classifier(_features(net, recipe["arch"], xv)).argmax(-1) == data.labels["val"]).float().mean()
    net.pretext_val_accuracy = float(acc)
    return net


def base_folder(name: str, **overrides) -> Path:
    """data/bases/<name>-<recipe hash>: where the offline base of this recipe is cached."""
    return cache_root() / "bases" / f"{name}-{recipe_hash(recipe_for(name, **overrides))}"


def offline_base_is_built(name: str, **overrides) -> bool:
    """Whether this recipe's base is cached, so loading it reads weights instead of pretraining."""
    return (base_folder(name, **overrides) / "model.safetensors").exists()


def load_or_pretrain(name: str, progress: bool = True, **overrides) -> nn.Module:
    """The pretrained offline base `name`, from data/bases/ or pretrained now and cached."""
    recipe = recipe_for(name, **overrides)
    folder = base_folder(name, **overrides)
    weights = folder / "model.safetensors"
    if weights.exists():
        net = build_architecture(recipe)
        net.load_state_dict(load_file(str(weights)))
        return net.eval()
    start = time.time()
    net = pretrain(recipe, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        (folder / "recipe.json").write_text(json.dumps(
            {**recipe, "pretext_val_accuracy": net.pretext_val_accuracy, "seconds": round(time.time() - start, 1)},
            indent=2, default=list))
    return net


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain (or find cached) offline base models.")
    parser.add_argument("--models", nargs="+", default=sorted(RECIPES), choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    args = parser.parse_args(argv)
    for name in args.models:
        start = time.time()
        load_or_pretrain(name, steps=args.steps)
        meta = json.loads((base_folder(name, steps=args.steps) / "recipe.json").read_text())
        print(f"{name}: pretext val accuracy {meta['pretext_val_accuracy']:.3f}, "
              f"pretrained in {meta['seconds']} s (this call {time.time() - start:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
