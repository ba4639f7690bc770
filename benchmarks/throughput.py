"""Training and merge-evaluation throughput of the offline suite, against this machine's own matmul peak.

    python -m benchmarks.throughput [--steps 30] [--jobs N]

Each workload is built as its offline config builds it (configs/offline/*.yaml: backbone, LoRA or
full update, Trap² settings), with random weights of the same architecture. For each it prints
images/s and model FLOP/s of one process on one thread, as every run computes, and of `jobs` such
processes at once, as the suite trains. Model FLOPs are the architecture's (matrix products,
convolutions and attention of one step with every token through every layer, counted by torch's
FlopCounterMode on the full forward), as MFU counts them: the class-token readout skips part of
them, which shows as a higher rate, not as less work. The peak is the best dense fp32 matmul rate of
all cores, measured in the same run. The last line, `training utilisation: X`, is the ViT LoRA Trap²
model FLOP rate of `jobs` processes divided by that peak.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {  # name: (config, protected)
    "vit-lora-plain": ("configs/offline/vit_lora.yaml", False),
    "vit-lora-trap2": ("configs/offline/vit_lora.yaml", True),
    "vit-full-plain": ("configs/offline/vit_full.yaml", False),
    "vit-full-trap2": ("configs/offline/vit_full.yaml", True),
    "convnext-lora-plain": ("configs/offline/convnext_lora.yaml", False),
    "convnext-lora-trap2": ("configs/offline/convnext_lora.yaml", True),
}
UTILISATION_WORKLOAD = "vit-lora-trap2"
N_CLASSES = 10


def matmul_peak(threads: int, sizes=(512, 1024, 2048), seconds: float = 1.0) -> float:
    """Best fp32 GEMM FLOP/s over a few square sizes, on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(sizes):
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    torch.set_num_threads(previous)
    return best


def build_workload(name: str):
    """(model, update, objective, batch, config) as the suite's trainer builds them, on random base weights."""
    from models.backbones import Backbone, get_backbone_spec
    from models.classifier import ZeroShotClassifier
    from models.pretrain import build_architecture, recipe_for
    from models.options import parse_config
    from training_scripts.config import TrainConfig
    from training_scripts.runs import build_objective
    from training_scripts.suite import SuiteConfig
    from models.layer_inputs import layer_input_grams
    from training_scripts.objective import RandomDecoys
    from training_scripts.vision import RANDOM_DECOY_DIRECTIONS, attach_update

    config, protected = WORKLOADS[name]
    suite = parse_config(SuiteConfig, ["--config", str(ROOT / config)])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{**{k: v for k, v in dataclasses.asdict(suite).items() if k in fields},
                         "dataset": "gtsrb", "lambda_reg": suite.lambda_reg if protected else 0.0})
    torch.manual_seed(0)
    net = build_architecture(recipe_for(cfg.model))
    for p in net.parameters():
        p.requires_grad_(False)
    backbone = Backbone(get_backbone_spec(cfg.model), net)
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, 32, 32)).shape[-1]
    model = ZeroShotClassifier(backbone, torch.randn(N_CLASSES, dim))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), generator=g, dtype=torch.uint8)
    batch = ((images.float() / 255 - 0.5) / 0.5, torch.randint(0, N_CLASSES, (cfg.batch_size,), generator=g))
    decoy_grams = None
    if protected and cfg.random_decoys:  # the decoy pass is a step's work too; D's values do not change its cost
        targets = cfg.lora_targets or backbone.spec.lora_targets
        names = [n for n in net.state_dict() if n.endswith(".weight") and n.split(".")[-2] in targets]
        decoy_grams = layer_input_grams(net, names, lambda: model(batch[0]))
    update = attach_update(model, cfg)
    objective = build_objective(cfg)
    if decoy_grams:
        objective.attach_decoys(RandomDecoys(model.backbone.net, decoy_grams, dict.fromkeys(decoy_grams, 1.0),
                                             cfg.decoy_scale, RANDOM_DECOY_DIRECTIONS), cfg.decoy_lambda)
    objective.replay_dropout(model)
    return model, update, objective, batch, cfg


def _loss(forward, batch):
    x, y = batch
    return F.cross_entropy(forward(x), y, reduction="none")


def _training_step(model, update, objective, batch, optimizer, params):
    optimizer.zero_grad(set_to_none=True)
    objective.backward(model, update, _loss, batch)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def step_flops(name: str):
    """Model FLOPs of one training step (every pass of the objective, forward and backward, with the full
    forward), and the workload's config."""
    from torch.utils.flop_counter import FlopCounterMode

    model, update, objective, batch, cfg = build_workload(name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    with FlopCounterMode(display=False) as counter:
        _training_step(model, update, objective, batch, optimizer, params)
    return counter.get_total_flops(), cfg


def _readout(model, mode: str):
    """As the trainer and models.vision.evaluate run (modes `train`, `eval`: the class-token readout), or with
    the tower's full forward (modes `train-full`, `eval-full`: what they ran before)."""
    return contextlib.nullcontext() if mode.endswith("-full") else model.backbone.class_token_readout()


def eval_flops(name: str) -> tuple[int, int]:
    """Model FLOPs of one evaluation batch (the full forward), and its size (the config's eval_batch_size)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, *_, cfg = build_workload(name)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(cfg.eval_batch_size, 3, 32, 32))
    return counter.get_total_flops(), cfg.eval_batch_size


def _time_workload(name: str, steps: int, mode: str, start_barrier=None) -> float:
    """Seconds per training step (modes `train`, `train-full`) or per evaluation batch (`eval`, `eval-full`),
    one thread."""
    from models.runtime import pin_threads

    pin_threads()
    model, update, objective, batch, cfg = build_workload(name)
    if mode.startswith("train"):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def work():
            with _readout(model, mode):
                _training_step(model, update, objective, batch, optimizer, params)
    else:
        model.eval()
        x = batch[0].repeat(cfg.eval_batch_size // len(batch[0]) + 1, 1, 1, 1)[:cfg.eval_batch_size]

        @torch.no_grad()
        def work():
            with _readout(model, mode):
                model(x).argmax(-1)
    for _ in range(3):
        work()
    if start_barrier is not None:
        start_barrier.wait()
    start = time.perf_counter()
    for _ in range(steps):
        work()
    return (time.perf_counter() - start) / steps


def _worker(name, steps, mode, barrier, results):
    results.put(_time_workload(name, steps, mode, barrier))


def concurrent_seconds(name: str, steps: int, mode: str, jobs: int) -> list[float]:
    """Per-step seconds of each of `jobs` processes running the workload at the same time."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(name, steps, mode, barrier, results)) for _ in range(jobs)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per workload and process")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes at once, as the suite trains (default: the core count)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.jobs < 1:
        parser.error("--steps and --jobs must be >= 1")
    workloads = list(dict.fromkeys(args.workloads + [UTILISATION_WORKLOAD]))
    cores = os.cpu_count() or 1
    peak = matmul_peak(cores)
    print(f"dense fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {cores} cores "
          f"({matmul_peak(1) / 1e9:.1f} on one); {args.jobs} processes of one thread each")
    print(f"{'workload':<22} {'GFLOP/step':>10} {'1 proc img/s':>13} {'GFLOP/s':>8} "
          f"{f'{args.jobs} procs img/s':>15} {'GFLOP/s':>8} {'of peak':>8}")

    def row(label: str, flops: int, batch: int, single: float, together: list[float]) -> float:
        """Prints one workload's line; returns the share of the peak of `jobs` processes."""
        rate = sum(flops / t for t in together)
        print(f"{label:<22} {flops / 1e9:>10.2f} {batch / single:>13.0f} {flops / single / 1e9:>8.1f} "
              f"{sum(batch / t for t in together):>15.0f} {rate / 1e9:>8.1f} {rate / peak:>8.2f}", flush=True)
        return rate / peak

    utilisation = None
    for name in workloads:
        flops, cfg = step_flops(name)
        rates = {}
        for mode in ("train", "train-full") if name == UTILISATION_WORKLOAD else ("train",):
            together = concurrent_seconds(name, args.steps, mode, args.jobs)
            share = row(name + (", full fwd" if mode == "train-full" else ""), flops, cfg.batch_size,
                        _time_workload(name, args.steps, mode), together)
            rates[mode] = sum(cfg.batch_size / t for t in together)
            if mode == "train" and name == UTILISATION_WORKLOAD:
                utilisation = share
        if len(rates) == 2:
            print(f"{name}: the class-token readout trains {rates['train'] / rates['train-full']:.2f}x as many "
                  f"images/s as the full forward")
    for name in ("vit-lora-plain", "convnext-lora-plain"):
        if name not in workloads:
            continue
        steps = max(1, args.steps // 3)  # an evaluation batch (512 images) is about 3 training steps' work
        flops, batch = eval_flops(name)
        short = name.replace("-plain", "")
        rates = {}
        for mode in ("eval", "eval-full") if name.startswith("vit") else ("eval",):  # ConvNeXt has no readout
            together = concurrent_seconds(name, steps, mode, args.jobs)
            row(f"{short} {'merge eval' if mode == 'eval' else 'eval, full fwd'}", flops, batch,
                _time_workload(name, steps, mode), together)
            rates[mode] = sum(batch / t for t in together)
        if len(rates) == 2:
            print(f"{short}: the class-token readout evaluates {rates['eval'] / rates['eval-full']:.2f}x as many "
                  f"images/s as the full forward")
    print(f"training utilisation: {utilisation:.2f}")


if __name__ == "__main__":
    main()
