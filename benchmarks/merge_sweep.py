"""A 99-coefficient TIES sweep in Core space over 8 LoRA adapters at ViT-B/32 shapes: the cached
TaskMerger (decompose once, merge once, re-apply per coefficient) against recomputing everything
for each coefficient, measured in one run. Target speedup >= 10.

    python -m benchmarks.merge_sweep [--coefficients 99]
"""
from __future__ import annotations

import argparse
import time

import torch

from models.updates import LoraFactors, ReleasedUpdate
from task_merger import TaskMerger, apply_merged

WIDTH, LAYERS, RANK, TASKS = 768, 12, 16, 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_adapters(seed: int = 0) -> list[ReleasedUpdate]:
    g = torch.Generator().manual_seed(seed)
    names = [f"vision_model.encoder.layers.{i}.self_attn.{p}.weight" for i in range(LAYERS) for p in PROJECTIONS]
    return [ReleasedUpdate(f"task{t}", "lora", {"base_fingerprint": "bench"},
                           lora={n: LoraFactors(torch.randn(RANK, WIDTH, generator=g) * 0.02,
                                                torch.randn(WIDTH, RANK, generator=g) * 0.02, 1.0) for n in names})
            for t in range(TASKS)]


def module_with(names: list[str]) -> torch.nn.Module:
    """A module whose parameters carry exactly these dotted names (random base weights)."""
    root = torch.nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(torch.randn(WIDTH, WIDTH)))
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coefficients", type=int, default=99)
    parser.add_argument("--recompute_sample", type=int, default=None,
                        help="time the recomputing sweep on only the first N coefficients and scale up (default: all)")
    args = parser.parse_args(argv)
    updates = random_adapters()
    names = updates[0].names()
    net = module_with(names)
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    coefficients = [round(0.1 * (i + 1), 1) for i in range(args.coefficients)]

    start = time.perf_counter()
    merger = TaskMerger(updates, "core")
    for c in coefficients:
        apply_merged(net, base, merger.merge("ties", top_k=30), c)
    cached = time.perf_counter() - start

    timed = coefficients[:args.recompute_sample or len(coefficients)]
    start = time.perf_counter()
    for c in timed:
        apply_merged(net, base, TaskMerger(updates, "core").merge("ties", top_k=30), c)
    per_point = (time.perf_counter() - start) / len(timed)
    recomputed = per_point * len(coefficients)
    print(f"{TASKS} adapters, {len(names)} layers {WIDTH}x{WIDTH} rank {RANK}, {len(coefficients)} coefficients: "
          f"cached sweep {cached:.2f} s; recomputing {per_point:.2f} s per coefficient "
          f"({len(timed)} timed) -> {recomputed:.1f} s")
    print(f"sweep speedup cached/recomputed: {recomputed / cached:.1f}")


if __name__ == "__main__":
    main()
