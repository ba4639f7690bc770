"""What every vision run builds: the base (and its fingerprint), tasks, their heads, accuracy."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataset.vision import VisionTask, load_vision_task
from models.backbones import Base
from models.classifier import ZeroShotClassifier, cached_head, prototype_head
from models.pretrain import recipe_hash
from models.storage import cache_root


@dataclass(frozen=True)
class DataSettings:
    """Which data a run (or a merge evaluation) reads; the trainer's config fields of the same names."""

    suite: str = "offline"
    data_seed: int = 0
    split_sizes: dict | None = None  # offline: sizes to generate; vision8: caps for quick runs
    head_shots: int = 16  # prototype heads only
    data_root: str | None = None  # vision8: default $TRAP2_DATASETS or data/datasets
    val_index_dir: str | None = None  # vision8: folder of KnOTS <name>_shuffled_idxs.pt files
    download: bool = False
    num_workers: int | None = None  # None: 0 in memory, up to 8 for files

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "DataSettings":
        """From a run's config (older runs may lack newer fields), with non-None overrides."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return 0 if self.suite == "offline" else min(8, os.cpu_count() or 1)


def task_head(base: Base, task: VisionTask, data: DataSettings) -> torch.Tensor:
    """The frozen zero-shot head of a task for this base, shared by every run (cached on disk).

    The paper's datasets on a backbone with a text tower get CLIP text heads; everything else
    gets prototype heads (normalised class means of base features of a few training images).
    """
    if data.suite == "vision8" and base.backbone.spec.text_encoder is not None:
        from dataset.parsing.heads import text_head

        return text_head(base.backbone, base.fingerprint, task.name, task.classes)
    # Other split sizes draw other training images, so they get their own head.
    sizes = "" if data.split_sizes is None else f"-sizes{recipe_hash(data.split_sizes)}"
    path = (cache_root() / "heads" / base.fingerprint /
            f"{data.suite}-{task.name}-seed{data.data_seed}-shots{data.head_shots}{sizes}.safetensors")
    device = next(base.backbone.parameters()).device

    def make():
        images, labels = zip(*task.batches("train", 512))  # one pass over the training images
        images, labels = torch.cat(images), torch.cat(labels)
        return prototype_head(base.backbone, images.to(device), labels.to(device), len(task.classes),
                              data.head_shots).cpu()

    return cached_head(path, make)


def load_task(base: Base, name: str, data: DataSettings) -> VisionTask:
    spec = base.backbone.spec
    device = next(base.backbone.parameters()).device
    preprocess = base.backbone.preprocess if data.suite == "vision8" else None  # offline tasks come as tensors
    return load_vision_task(data.suite, name, spec.mean, spec.std, seed=data.data_seed, sizes=data.split_sizes,
                            preprocess=preprocess, data_root=data.data_root, val_index_dir=data.val_index_dir,
                            download=data.download, num_workers=data.workers(), pin_memory=device.type == "cuda")


def classifier_for(base: Base, task: VisionTask, data: DataSettings) -> ZeroShotClassifier:
    head = task_head(base, task, data)
    return ZeroShotClassifier(base.backbone, head.to(next(base.backbone.parameters()).device))


@torch.no_grad()
def evaluate(model: ZeroShotClassifier, task: VisionTask, split: str, batch_size: int = 256,
             device: torch.device | str = "cpu", limit: int | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on one split (the first `limit` images if given)."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    with model.backbone.class_token_readout():
        for x, y in task.batches(split, batch_size, limit):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
    model.train(was_training)
    return {"accuracy": correct / n, "loss": loss / n}
