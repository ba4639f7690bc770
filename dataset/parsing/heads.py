"""Zero-shot heads from a backbone's text tower: per class, the normalised mean of the normalised
embeddings of every CLIP prompt template filled with the class name (CLIP's recipe).

One cached file per (backbone weights, dataset): data/heads/<base fingerprint>/vision8-<dataset>.safetensors,
holding the class names, so a head is never silently reused for another class list.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from tqdm.auto import tqdm

from dataset.vision8 import DATASETS, load_splits
from models.backbones import TextEncoder, get_backbone_spec, load_base
from models.classifier import write_head
from models.storage import cache_root


@torch.no_grad()
def zero_shot_head(encode: TextEncoder, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    rows = []
    for name in classes:
        emb = F.normalize(encode([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def head_path(fingerprint: str, dataset: str) -> Path:
    return cache_root() / "heads" / fingerprint / f"vision8-{dataset}.safetensors"


def read_head(path: Path, classes: Sequence[str]) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        stored = json.loads((f.metadata() or {}).get("classes", "null"))
        head = f.get_tensor("head")
    if stored != list(classes):
        raise ValueError(f"{path} was built for other class names ({len(stored or [])} classes, dataset has "
                         f"{len(classes)}); regenerate it with --overwrite true")
    return head


def text_head(backbone, fingerprint: str, dataset: str, classes: Sequence[str], overwrite: bool = False,
              encoder: TextEncoder | None = None) -> torch.Tensor:
    """The cached head of a dataset for this backbone, built with its text tower when missing."""
    path = head_path(fingerprint, dataset)
    if path.exists() and not overwrite:
        return read_head(path, classes)
    head = zero_shot_head(encoder or backbone.text_encoder(), classes, DATASETS[dataset].templates)
    write_head(path, head, {"classes": json.dumps(list(classes)), "templates": json.dumps(DATASETS[dataset].templates)})
    return head


def main(argv=None, default_model: str = "clip-vit-b32", family: str | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Build and cache the zero-shot text heads of the eight datasets.")
    parser.add_argument("--model", default=default_model, help="registered backbone with a text tower")
    parser.add_argument("--base_options", type=yaml.safe_load, default=None,
                        help="backbone options, e.g. '{pretrained: /path/to/local/copy}'")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--data_root", default=None, help="where the datasets lie (default $TRAP2_DATASETS or data/datasets)")
    parser.add_argument("--download", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
    parser.add_argument("--overwrite", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
    args = parser.parse_args(argv)
    spec = get_backbone_spec(args.model)
    if family is not None and spec.family != family:
        parser.error(f"{args.model} is a {spec.family} backbone; this command builds {family} heads")
    if spec.text_encoder is None:
        parser.error(f"{args.model} has no text tower (offline bases use prototype heads)")
    base = load_base(args.model, args.base_options)
    encoder = base.backbone.text_encoder()
    paths = []
    for name in tqdm(args.datasets, desc="heads"):
        _, classes = load_splits(name, args.data_root, download=args.download)
        text_head(base.backbone, base.fingerprint, name, classes, args.overwrite, encoder)
        paths.append(head_path(base.fingerprint, name))
        print(f"{name}: {len(classes)} classes -> {paths[-1]}")
    return paths
