"""Writes tiny stand-ins of the eight datasets in their real on-disk layouts (files, not mocks).

Three classes each, a few images per split; each class has its own colour so a model can learn it.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

N_CLASSES = 3
PER_CLASS = {"train": 6, "val": 2, "test": 4}  # official train / val / test images per class
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]


def _image(rng, label: int, size=(40, 36)) -> np.ndarray:
    img = rng.integers(0, 60, size=(size[1], size[0], 3))
    img[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = COLOURS[label]
    return img.astype(np.uint8)


def _save(rng, path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(rng, label)).save(path)


def _samples(split: str):
    return [(c, i) for c in range(N_CLASSES) for i in range(PER_CLASS[split])]


def write_cars(root: Path, rng) -> None:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array([f"Maker Model {2000 + c}" for c in range(N_CLASSES)], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, folder, annos in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                                 ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
        records = np.zeros(len(_samples(split)), dtype=[("fname", object), ("class", object)])
        for k, (c, i) in enumerate(_samples(split)):
            fname = f"{k:05d}.jpg"
            _save(rng, base / folder / fname, c)
            records[k] = (fname, c + 1)  # the .mat files count classes from 1
        savemat(annos, {"annotations": records})


def _class_folders(rng, images: Path, classes: list[str], split: str) -> list[tuple[str, str]]:
    """Images under images/<class>/<class>_<split><i>.jpg; returns (class, file name) pairs."""
    pairs = []
    for c, i in _samples(split):
        name = f"{classes[c]}_{split}{i:03d}.jpg"
        _save(rng, images / classes[c] / name, c)
        pairs.append((classes[c], name))
    return pairs


def write_dtd(root: Path, rng) -> None:
    base = root / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    for split in ("train", "val", "test"):
        pairs = _class_folders(rng, base / "images", ["banded", "blotchy", "zigzagged"], split)
        (base / "labels" / f"{split}1.txt").write_text("".join(f"{c}/{name}\n" for c, name in pairs))


def write_eurosat(root: Path, rng) -> None:
    folders = ["AnnualCrop", "Forest", "River"]
    for split in ("train", "val", "test"):
        for c, i in _samples(split):
            _save(rng, root / "eurosat" / "EuroSAT_splits" / split / folders[c] / f"{folders[c]}_{split}_{i}.jpg", c)


def write_gtsrb(root: Path, rng) -> None:
    base = root / "gtsrb"
    for c, i in _samples("train"):
        _save(rng, base / "GTSRB" / "Training" / f"{c:05d}" / f"00000_{i:05d}.ppm", c)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for k, (c, _) in enumerate(_samples("test")):
        _save(rng, base / "GTSRB" / "Final_Test" / "Images" / f"{k:05d}.ppm", c)
        rows.append(f"{k:05d}.ppm;40;36;1;1;39;35;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def write_mnist(root: Path, rng) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = np.array([c for c, _ in _samples(split)], dtype=np.uint8)
        images = np.stack([_image(rng, c, (28, 28))[..., 0] for c in labels])
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(labels), 28, 28)
                                                          + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def write_resisc45(root: Path, rng) -> None:
    base = root / "resisc45"
    for split in ("train", "val", "test"):
        pairs = _class_folders(rng, base / "NWPU-RESISC45", ["airplane", "baseball_diamond", "sea_ice"], split)
        (base / f"resisc45-{split}.txt").write_text("".join(f"{name}\n" for _, name in pairs))


def write_aircraft(root: Path, rng) -> None:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A320", "Spitfire"]
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    k = 0
    for split in ("train", "val", "test"):
        lines = []
        for c, _ in _samples(split):
            _save(rng, data / "images" / f"{k:07d}.jpg", c)
            lines.append(f"{k:07d} {variants[c]}")
            k += 1
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def write_svhn(root: Path, rng) -> None:
    (root / "svhn").mkdir(parents=True)
    for split in ("train", "test"):
        labels = np.array([c for c, _ in _samples(split)])
        images = np.stack([_image(rng, c, (32, 32)) for c in labels], axis=-1)  # H, W, C, N as in the files
        savemat(root / "svhn" / f"{split}_32x32.mat",
                {"X": images, "y": np.where(labels == 0, 10, labels).reshape(-1, 1)})


WRITERS = {"cars": write_cars, "dtd": write_dtd, "eurosat": write_eurosat, "gtsrb": write_gtsrb,
           "mnist": write_mnist, "resisc45": write_resisc45, "aircraft": write_aircraft, "svhn": write_svhn}


def write_all(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for write in WRITERS.values():
        write(root, rng)
    return root
