"""The paper's eight vision datasets, read from local folders with the paper's split conventions.

    <data_root>/stanford_cars/  dtd/  eurosat/  gtsrb/  MNIST/  resisc45/  fgvc-aircraft-2013b/  svhn/

`data_root` defaults to $TRAP2_DATASETS, else data/datasets. torchvision's classes read the
datasets that have one; nothing is downloaded unless asked (`--download true`, for the datasets
whose hosts still serve them). Splits (reference spec §3):
- Cars, GTSRB, MNIST, SVHN: official train; validation = 20 % of the official test set, the rest is
  test. The 20 % are the first entries of a seeded permutation of the test set, or of a
  user-supplied KnOTS index file `<val_index_dir>/<name>_shuffled_idxs.pt` for exact parity.
- DTD: official partition 1 (train1/val1/test1). Aircraft: official train/val/test (variants).
- EuroSAT: the Representation Surgery folder split EuroSAT_splits/{train,val,test}.
- RESISC45: the official split files resisc45-{train,val,test}.txt over NWPU-RESISC45/.
Images go through the backbone's own preprocessing (`Backbone.preprocess`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from models.storage import cache_root

VAL_FRACTION = 0.2  # of the official test set, for the datasets without a validation split


class DatasetMissing(FileNotFoundError):
    """A dataset is not where it should be; the message says where to put it and how to get it."""


class ListDataset(Dataset):
    """(image path or array, label) pairs; items are (PIL image, label) like torchvision's."""

    def __init__(self, samples: list[tuple[object, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        source, label = self.samples[i]
        image = Image.fromarray(source) if isinstance(source, np.ndarray) else Image.open(source)
        return image.convert("RGB"), label


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    required: tuple[str, ...]  # paths under the root that must exist
    source: str  # where a user gets it
    templates: tuple[str, ...]  # CLIP prompt templates, "{}" is the class name
    load: Callable[[Path, bool], tuple[dict[str, Dataset], list[str]]]  # (root, download) -> splits, classes
    val_from_test: bool = False
    downloadable: bool = False


def _tv():
    import torchvision.datasets as tv

    return tv


def _cars(root, download):
    tv = _tv()
    train = tv.StanfordCars(str(root), split="train")
    return {"train": train, "test": tv.StanfordCars(str(root), split="test")}, list(train.classes)


def _dtd(root, download):
    tv = _tv()
    splits = {s: tv.DTD(str(root), split=s, partition=1, download=download) for s in ("train", "val", "test")}
    return splits, [c.replace("_", " ") for c in splits["train"].classes]


EUROSAT_NAMES = {  # folder -> the CLIP class name
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}


def _eurosat(root, download):
    tv = _tv()
    splits = {s: tv.ImageFolder(str(root / "eurosat" / "EuroSAT_splits" / s)) for s in ("train", "val", "test")}
    folders = splits["train"].classes
    for s, ds in splits.items():
        if ds.classes != folders:
            raise DatasetMissing(f"EuroSAT_splits/{s} has classes {ds.classes}, train has {folders}")
    unknown = [f for f in folders if f not in EUROSAT_NAMES]
    if unknown:
        raise DatasetMissing(f"EuroSAT_splits holds unknown class folders {unknown}; expected {sorted(EUROSAT_NAMES)}")
    return splits, [EUROSAT_NAMES[f] for f in folders]


GTSRB_NAMES = [
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory", "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
]


def _gtsrb(root, download):
    tv = _tv()
    return {s: tv.GTSRB(str(root), split=s, download=download) for s in ("train", "test")}, list(GTSRB_NAMES)


DIGITS = [str(i) for i in range(10)]


def _mnist(root, download):
    tv = _tv()
    return {s: tv.MNIST(str(root), train=s == "train", download=download) for s in ("train", "test")}, list(DIGITS)


def _resisc45(root, download):
    base = root / "resisc45"
    images = base / "NWPU-RESISC45"
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s in ("train", "val", "test"):
        samples = []
        for line in (base / f"resisc45-{s}.txt").read_text().split():
            folder = line.rsplit("_", 1)[0]  # "baseball_diamond_001.jpg" -> "baseball_diamond"
            if folder not in index:
                raise DatasetMissing(f"resisc45-{s}.txt lists {line}, but NWPU-RESISC45/{folder}/ does not exist")
            samples.append((images / folder / line, index[folder]))
        splits[s] = ListDataset(samples)
    return splits, [c.replace("_", " ") for c in classes]


def _aircraft(root, download):
    tv = _tv()
    splits = {s: tv.FGVCAircraft(str(root), split=s, annotation_level="variant", download=download)
              for s in ("train", "val", "test")}
    return splits, list(splits["train"].classes)


def _svhn(root, download):
    """Read from the official .mat files (torchvision's class insists on their md5)."""
    from scipy.io import loadmat

    splits = {}
    for s in ("train", "test"):
        path = root / "svhn" / f"{s}_32x32.mat"
        if download and not path.exists():
            from torchvision.datasets import SVHN
            from torchvision.datasets.utils import download_url

            url, filename, md5 = SVHN.split_list[s]
            download_url(url, str(path.parent), filename, md5)
        mat = loadmat(str(path))
        images = np.transpose(mat["X"], (3, 0, 1, 2))  # H, W, C, N -> N, H, W, C
        labels = mat["y"].astype(np.int64).reshape(-1) % 10  # the files label the digit 0 as 10
        splits[s] = ListDataset([(images[i], int(labels[i])) for i in range(len(labels))])
    return splits, list(DIGITS)


_DIGIT_TEMPLATES = ('a photo of the number: "{}".',)
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("cars", "Stanford Cars",
                ("stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
                 "stanford_cars/cars_train", "stanford_cars/cars_test_annos_withlabels.mat", "stanford_cars/cars_test"),
                "no longer served by Stanford; a mirror is the Kaggle dataset 'jessicali9530/stanford-cars-dataset' "
                "plus cars_test_annos_withlabels.mat",
                ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                 "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."),
                _cars, val_from_test=True),
    DatasetSpec("dtd", "Describable Textures (DTD)", ("dtd/dtd/images", "dtd/dtd/labels/train1.txt"),
                "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (or --download true)",
                ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
                 "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
                 "a photo of the {} thing.", "a photo of the {} object."),
                _dtd, downloadable=True),
    DatasetSpec("eurosat", "EuroSAT (Representation Surgery split)",
                ("eurosat/EuroSAT_splits/train", "eurosat/EuroSAT_splits/val", "eurosat/EuroSAT_splits/test"),
                "the RGB EuroSAT images (https://github.com/phelber/EuroSAT) sorted into EuroSAT_splits/"
                "{train,val,test}/<ClassFolder>/ as in the task-vectors / Representation Surgery releases",
                ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                 "a centered satellite photo of the {}."),
                _eurosat),
    DatasetSpec("gtsrb", "German Traffic Sign Recognition (GTSRB)",
                ("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"),
                "https://benchmark.ini.rub.de/gtsrb_dataset.html (or --download true)",
                ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
                 'a close up photo of a "{}" traffic sign.'),
                _gtsrb, val_from_test=True, downloadable=True),
    DatasetSpec("mnist", "MNIST", ("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-images-idx3-ubyte"),
                "http://yann.lecun.com/exdb/mnist/ (or --download true)", _DIGIT_TEMPLATES,
                _mnist, val_from_test=True, downloadable=True),
    DatasetSpec("resisc45", "RESISC45",
                ("resisc45/NWPU-RESISC45", "resisc45/resisc45-train.txt", "resisc45/resisc45-val.txt",
                 "resisc45/resisc45-test.txt"),
                "NWPU-RESISC45 images plus the official split files resisc45-{train,val,test}.txt "
                "(as published with tensorflow-datasets)",
                ("satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.", "aerial photo of {}.",
                 "satellite view of {}.", "aerial view of {}.", "satellite imagery of a {}.",
                 "aerial imagery of a {}.", "satellite photo of a {}.", "aerial photo of a {}.",
                 "satellite view of a {}.", "aerial view of a {}.", "satellite imagery of the {}.",
                 "aerial imagery of the {}.", "satellite photo of the {}.", "aerial photo of the {}.",
                 "satellite view of the {}.", "aerial view of the {}."),
                _resisc45),
    DatasetSpec("aircraft", "FGVC-Aircraft (variants)",
                ("fgvc-aircraft-2013b/data/images", "fgvc-aircraft-2013b/data/variants.txt"),
                "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (or --download true)",
                ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
                _aircraft, downloadable=True),
    DatasetSpec("svhn", "SVHN (cropped digits)", ("svhn/train_32x32.mat", "svhn/test_32x32.mat"),
                "http://ufldl.stanford.edu/housenumbers/ train_32x32.mat and test_32x32.mat (or --download true)",
                _DIGIT_TEMPLATES, _svhn, val_from_test=True, downloadable=True),
)}


def default_data_root() -> Path:
    return Path(os.environ.get("TRAP2_DATASETS") or cache_root() / "datasets")


def check_present(spec: DatasetSpec, root: Path, download: bool = False) -> None:
    """Fails early, naming what is missing, where it goes and where to get it."""
    missing = [p for p in spec.required if not (root / p).exists()]
    if not missing or (download and spec.downloadable):
        return
    hint = "or pass --download true to fetch it" if spec.downloadable else "it cannot be downloaded automatically"
    raise DatasetMissing(
        f"{spec.title} not found under {root}: missing {', '.join(missing)}.\n"
        f"Get it from {spec.source} and lay it out so that these paths exist under --data_root "
        f"(default $TRAP2_DATASETS or data/datasets), {hint}.")


def validation_split(name: str, n_test: int, seed: int, val_index_dir: str | os.PathLike | None):
    """(val indices, test indices) into the official test set: the first 20 % of a permutation."""
    if val_index_dir is not None:
        path = Path(val_index_dir) / f"{name}_shuffled_idxs.pt"
        if not path.exists():
            raise DatasetMissing(f"validation index file {path} does not exist (KnOTS names it "
                                 f"{name}_shuffled_idxs.pt); drop --val_index_dir to use a seeded permutation")
        order = torch.load(path, map_location="cpu", weights_only=True)  # a tensor, never arbitrary pickles
        order = torch.as_tensor(order)
        if order.dim() != 1 or order.dtype.is_floating_point or not torch.equal(
                torch.sort(order.long()).values, torch.arange(n_test)):
            raise ValueError(f"{path} must hold a permutation of the {n_test} test indices of {name}, got "
                             f"{order.dtype} of shape {tuple(order.shape)}; is it the file for this dataset?")
        order = order.long()
    else:
        order = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))
    n_val = int(VAL_FRACTION * n_test)
    return order[:n_val].tolist(), order[n_val:].tolist()


def check_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False) -> None:
    """Before any weights are loaded: a known name whose files are in place (or will be downloaded)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    check_present(DATASETS[name], Path(root) if root else default_data_root(), download)


def load_splits(name: str, root: str | os.PathLike | None = None, seed: int = 0,
                val_index_dir: str | os.PathLike | None = None, download: bool = False,
                caps: dict[str, int] | None = None) -> tuple[dict[str, Dataset], list[str]]:
    """{"train", "val", "test"} datasets of (PIL image, label) and the class names of one dataset."""
    check_dataset(name, root, download)
    spec = DATASETS[name]
    root = Path(root) if root else default_data_root()
    splits, classes = spec.load(root, download)
    if spec.val_from_test:
        val_idx, test_idx = validation_split(name, len(splits["test"]), seed, val_index_dir)
        splits = {"train": splits["train"], "val": Subset(splits["test"], val_idx),
                  "test": Subset(splits["test"], test_idx)}
    for split, cap in (caps or {}).items():  # quick runs: a seeded random `cap` images of a split
        if cap is not None and cap < len(splits[split]):
            pick = torch.randperm(len(splits[split]), generator=torch.Generator().manual_seed(seed))[:cap]
            splits[split] = Subset(splits[split], sorted(pick.tolist()))
    return splits, classes
