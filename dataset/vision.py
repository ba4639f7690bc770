"""Vision tasks behind one interface: class names and batches of normalised images per split."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from dataset.offline import PAPER_TASKS, load_offline_task

SUITES = ("offline",)


class VisionTask(Protocol):
    name: str
    classes: list[str]

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def size(self, split: str) -> int: ...

    def batch(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TensorVisionTask:
    """A task held in memory as uint8 tensors, normalised per batch (the offline suite)."""

    name: str
    classes: list[str]
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def size(self, split: str) -> int:
        return len(self.labels[split])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std

    def batch(self, split, indices):
        return self.normalise(self.images[split][indices]), self.labels[split][indices]

    def batches(self, split, batch_size, shuffle=False, generator=None):
        n = self.size(split)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            yield self.batch(split, order[i:i + batch_size])


def load_vision_task(suite: str, name: str, mean, std, seed: int = 0,
                     sizes: dict[str, int] | None = None) -> VisionTask:
    if suite == "offline":
        if name not in PAPER_TASKS:
            raise KeyError(f"unknown offline task {name!r}; choose one of {list(PAPER_TASKS)}")
        t = load_offline_task(name, seed=seed, sizes=sizes)
        return TensorVisionTask(t.name, t.classes, t.images, t.labels, tuple(mean), tuple(std))
    raise KeyError(f"unknown suite {suite!r}; choose one of {SUITES}")
