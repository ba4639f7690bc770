"""Backbone + frozen zero-shot head, and the offline stand-in for CLIP's text heads.

logits = logit_scale · normalise(features) @ headᵀ, as in the paper (CLIP text heads, scale 100).
Offline, the head of a task is the normalised mean base feature of a few labelled examples per
class ("prototypes"), computed once per (base, task) and cached, so every run on that task shares it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.backbones import Backbone
from models.storage import atomic_path

LOGIT_SCALE = 100.0


class ZeroShotClassifier(nn.Module):
    def __init__(self, backbone: Backbone, head: torch.Tensor, logit_scale: float = LOGIT_SCALE):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("head", F.normalize(head.float(), dim=-1))
        self.logit_scale = logit_scale

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.backbone(pixel_values).float(), dim=-1)
        return self.logit_scale * features @ self.head.T


@torch.no_grad()
def prototype_head(backbone: Backbone, images: torch.Tensor, labels: torch.Tensor, n_classes: int,
                   shots: int, batch_size: int = 256) -> torch.Tensor:
    """Normalised class means of base features over the first `shots` examples of each class."""
    picks = torch.cat([(labels == c).nonzero().flatten()[:shots] for c in range(n_classes)])
    if any((labels[picks] == c).sum() == 0 for c in range(n_classes)):
        raise ValueError("every class needs at least one example to build its prototype")
    was_training = backbone.training
    backbone.eval()
    feats = torch.cat([F.normalize(backbone(images[picks[i:i + batch_size]]).float(), dim=-1)
                       for i in range(0, len(picks), batch_size)])
    backbone.train(was_training)
    head = torch.stack([feats[labels[picks] == c].mean(0) for c in range(n_classes)])
    return F.normalize(head, dim=-1)


def write_head(path: Path, head: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
    """Writes a head as safetensors atomically (a crash never leaves a half-written cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"head": head.contiguous()}, str(tmp), metadata=metadata)


def cached_head(path: Path, make) -> torch.Tensor:
    """Reads a head from `path` (safetensors) or builds it with `make()` and writes it there."""
    if path.exists():
        return load_file(str(path))["head"]
    head = make()
    write_head(path, head)
    return head
