"""Vision tasks behind one interface: class names and batches of normalised images per split.

Two kinds: the offline suite held in memory as tensors, and the paper's eight datasets read from
files (dataset.vision8) through the backbone's preprocessing, with worker processes preparing whole
batches ahead of the GPU (`prefetched`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from dataset.offline import PAPER_TASKS, load_offline_task

SUITES = ("offline", "vision8")


class VisionTask(Protocol):
    name: str
    classes: list[str]

    def batches(self, split: str, batch_size: int,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order, in batches; only its first `limit` images if given."""

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

    def batches(self, split, batch_size, limit=None):
        yield from prefetched(self, split, _chunks(self.size(split), batch_size, limit))


@dataclass
class FileVisionTask:
    """A task read from files: (PIL image, label) datasets per split, preprocessed per batch."""

    name: str
    classes: list[str]
    splits: dict[str, Dataset]
    preprocess: Callable[[Sequence[object]], torch.Tensor]
    num_workers: int = 0
    pin_memory: bool = False

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batch(self, split, indices):
        items = [self.splits[split][int(i)] for i in indices]
        images = [image.convert("RGB") for image, _ in items]  # MNIST is greyscale
        return self.preprocess(images), torch.tensor([label for _, label in items])

    def batches(self, split, batch_size, limit=None):
        yield from prefetched(self, split, _chunks(self.size(split), batch_size, limit),
                              self.num_workers, self.pin_memory)


def _chunks(n: int, batch_size: int, limit: int | None) -> list[torch.Tensor]:
    # Cut before batching, so workers never prepare batches past the limit.
    order = torch.arange(n if limit is None else min(n, limit))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class _BatchList(Dataset):
    """Item k is the whole k-th batch, so each worker decodes and preprocesses a batch at once."""

    def __init__(self, task: VisionTask, split: str, chunks: Sequence[torch.Tensor]):
        self.task, self.split, self.chunks = task, split, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        return self.task.batch(self.split, self.chunks[k])


def prefetched(task: VisionTask, split: str, chunks: Sequence[torch.Tensor], num_workers: int = 0,
               pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of `chunks` in order; with workers, prepared in parallel ahead of use."""
    if num_workers == 0:
        for chunk in chunks:
            yield task.batch(split, chunk)
        return
    yield from DataLoader(_BatchList(task, split, chunks), batch_size=None, num_workers=num_workers,
                          pin_memory=pin_memory, prefetch_factor=4)


def load_vision_task(suite: str, name: str, mean, std, seed: int = 0, sizes: dict[str, int] | None = None,
                     preprocess: Callable | None = None, data_root: str | None = None,
                     val_index_dir: str | None = None, download: bool = False, num_workers: int = 0,
                     pin_memory: bool = False) -> VisionTask:
    """`sizes`: offline, the split sizes to generate; vision8, caps for quick runs."""
    if suite == "offline":
        if name not in PAPER_TASKS:
            raise KeyError(f"unknown offline task {name!r}; choose one of {list(PAPER_TASKS)}")
        t = load_offline_task(name, seed=seed, sizes=sizes)
        return TensorVisionTask(t.name, t.classes, t.images, t.labels, tuple(mean), tuple(std))
    if suite == "vision8":
        from dataset.vision8 import load_splits

        if preprocess is None:
            raise ValueError("the vision8 datasets need a backbone with its own image preprocessing "
                             "(clip-vit-b32, clip-vit-l14, convnext-base-w); the offline bases use --suite offline")
        splits, classes = load_splits(name, data_root, seed, val_index_dir, download, sizes)
        return FileVisionTask(name, classes, splits, preprocess, num_workers, pin_memory)
    raise KeyError(f"unknown suite {suite!r}; choose one of {SUITES}")
