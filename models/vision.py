"""What every vision run builds: the base (and its fingerprint), tasks, their heads, accuracy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataset.offline import cache_root
from dataset.vision import VisionTask, load_vision_task
from models.backbones import Backbone, build_backbone
from models.classifier import ZeroShotClassifier, cached_head, prototype_head
from models.updates import fingerprint


@dataclass
class Base:
    backbone: Backbone
    fingerprint: str
    name: str
    options: dict  # what build_backbone needs to rebuild exactly this base


def load_base(name: str, options: dict | None = None, device: torch.device | str = "cpu") -> Base:
    options = {k: v for k, v in (options or {}).items() if v is not None}
    backbone = build_backbone(name, **options)
    fp = fingerprint(backbone.net.state_dict())
    for p in backbone.parameters():
        p.requires_grad_(False)
    return Base(backbone.to(device).eval(), fp, name, options)


def task_head(base: Base, task: VisionTask, suite: str, shots: int, data_seed: int) -> torch.Tensor:
    """The frozen zero-shot head of a task for this base, shared by every run (cached on disk)."""
    path = cache_root() / "heads" / base.fingerprint / f"{suite}-{task.name}-seed{data_seed}-shots{shots}.safetensors"
    device = next(base.backbone.parameters()).device

    def make():
        images = torch.cat([x for x, _ in task.batches("train", 512)])
        labels = torch.cat([y for _, y in task.batches("train", 512)])
        return prototype_head(base.backbone, images.to(device), labels.to(device), len(task.classes), shots).cpu()

    return cached_head(path, make)


def load_task(base: Base, suite: str, name: str, data_seed: int, sizes: dict | None = None) -> VisionTask:
    spec = base.backbone.spec
    return load_vision_task(suite, name, spec.mean, spec.std, seed=data_seed, sizes=sizes)


def classifier_for(base: Base, task: VisionTask, suite: str, shots: int, data_seed: int) -> ZeroShotClassifier:
    head = task_head(base, task, suite, shots, data_seed)
    return ZeroShotClassifier(base.backbone, head.to(next(base.backbone.parameters()).device))


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: VisionTask, split: str, batch_size: int = 256,
             device: torch.device | str = "cpu", limit: int | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on one split (the first `limit` images if given)."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in task.batches(split, batch_size):
        if limit is not None:
            if n >= limit:
                break
            x, y = x[:limit - n], y[:limit - n]
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    model.train(was_training)
    return {"accuracy": correct / n, "loss": loss / n}
