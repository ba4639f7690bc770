"""The one training loop: Trap² objective, clipping, AdamW + cosine warm-up, early stopping, resume.

Task-agnostic: the caller gives a loss function, a batch for each step and a validation metric.
Everything needed to continue bit for bit (weights, optimiser, scheduler, scaler, RNG streams,
early-stopping state) is checkpointed at every evaluation; batches are a pure function of the
step, so a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from models.schedules import SCHEDULES
from models.storage import append_jsonl, atomic_path
from models.updates import ScaledUpdate
from models import distributed
from training_scripts.objective import LossFn, Trap2Objective
from training_scripts.reporting import Reporter, make_reporter

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoopSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    max_steps: int
    warmup_steps: int
    max_grad_norm: float | None  # None: no clipping (the norm is still logged)
    max_update_norm: float | None  # None: unbounded; else ‖ΔW‖_F is scaled back onto it after each step
    eval_freq: int
    patience: int
    min_delta: float
    amp: str  # fp16 | bf16 | none (resolved)
    progress: bool = True
    schedule: str = "cosine"  # cosine | linear
    grad_accum: int = 1  # micro-batches per step: batch_at(step * grad_accum + i)
    schedule_steps: int | None = None  # the LR decay's span; None: max_steps
    report_to: str = "none"  # none | tensorboard | wandb (training_scripts.reporting)
    run_config: dict | None = None  # the run's settings, for a reporter that records them


@dataclass
class LoopResult:
    best_metric: float
    best_step: int
    steps_run: int
    seconds: float
    stopped_early: bool


def resolve_amp(amp: str, device: torch.device, auto_gpu: str = "fp16") -> str:
    """`auto`: `auto_gpu` on a GPU (fp16 + GradScaler for vision, bf16 for LLMs), none on CPU."""
    if amp == "auto":
        return auto_gpu if device.type == "cuda" else "none"
    if amp != "none" and device.type != "cuda":
        raise ValueError(f"--amp {amp} needs a GPU; use --amp none (or auto) on {device.type}")
    return amp


class MetricsLog:
    """JSON lines, one record a write, so a crash loses at most the line being written (cut off on the next);
    each record also goes to the --report_to reporter, if any."""

    def __init__(self, path: Path, reporter: Reporter | None = None):
        self.path, self.reporter = path, reporter

    def write(self, **record) -> None:
        append_jsonl(self.path, record)
        if self.reporter is not None:
            self.reporter(record)


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def run_loop(model: nn.Module, update: ScaledUpdate, objective: Trap2Objective, loss_fn: LossFn,
             batch_at: Callable[[int], object], evaluate: Callable[[], float], settings: LoopSettings,
             out_dir: Path, device: torch.device, on_step: Callable[[int, list], None] | None = None) -> LoopResult:
    """Trains the model's trainable parameters in place; on return they hold the best update.

    Under a multi-process launch, `batch_at` gives this process's shard, `evaluate` must return
    the same value on every process, and only the main process writes files. `on_step(step, params)` is
    called after each optimiser step with the trainable parameters (logging, checks).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(trainable)
    main = distributed.is_main()
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=settings.betas, eps=settings.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(SCHEDULES[settings.schedule], warmup=settings.warmup_steps, total=settings.schedule_steps or settings.max_steps))
    scaler = torch.amp.GradScaler("cuda") if settings.amp == "fp16" else None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    log = MetricsLog(out_dir / "metrics.jsonl", make_reporter(settings.report_to, out_dir, settings.run_config or {})
                     ) if main else None
    ckpt_path = out_dir / CHECKPOINT
    state = {"step": 0, "best_metric": -math.inf, "best_step": -1, "bad_evals": 0, "seconds": 0.0}
    best_weights = [p.detach().clone() for p in trainable]
    if ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # our own file, still no pickle
        except Exception as e:  # truncated by a full disk or a kill mid-save (saves are atomic, copies are not)
            raise ValueError(f"{ckpt_path} is unreadable ({type(e).__name__}); delete it to restart this run from "
                             f"step 0, or pass --overwrite true") from None
        with torch.no_grad():
            for p, w, b in zip(trainable, ckpt["weights"], ckpt["best_weights"]):
                p.copy_(w)
            best_weights = [b.to(device) for b in ckpt["best_weights"]]
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        objective.generator.set_state(ckpt["rng_scales"])
        state = ckpt["state"]
        if log:
            log.write(event="resume", step=state["step"])

    start = time.time() - state["seconds"]
    stopped_early = state["bad_evals"] >= settings.patience  # a resumed run that had already stopped
    first = settings.max_steps if stopped_early else state["step"]
    bar = tqdm(range(first, settings.max_steps), initial=state["step"], total=settings.max_steps,
               desc=f"training {out_dir.name}", disable=not (settings.progress and main))
    k = settings.grad_accum

    def scale_loss(loss):  # each micro-batch contributes 1/k of the step's gradient
        loss = loss / k if k > 1 else loss
        return scaler.scale(loss) if scaler else loss

    for step in bar:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for i in range(k):
            metrics = objective.backward(model, update, loss_fn, batch_at(step * k + i),
                                         scale_loss=scale_loss, autocast=autocast, step=step)
        distributed.average_gradients(trainable)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            trainable, math.inf if settings.max_grad_norm is None else settings.max_grad_norm))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if settings.max_update_norm is not None:
            metrics["update_norm"] = update.bound_norm_(settings.max_update_norm)
        if on_step is not None:
            on_step(step, trainable)
        if step % 10 == 0 and main:
            bar.set_postfix({name: f"{v:.3f}" for name, v in metrics.items()})
            log.write(step=step, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, **metrics)
        done = step + 1
        if done % settings.eval_freq == 0 or done == settings.max_steps:
            metric = evaluate()
            improved = metric > state["best_metric"] + settings.min_delta
            if improved:
                state.update(best_metric=metric, best_step=done, bad_evals=0)
                best_weights = [p.detach().clone() for p in trainable]
            else:
                state["bad_evals"] += 1
            state.update(step=done, seconds=time.time() - start)
            if main:
                log.write(step=done, event="eval", val_metric=metric, best=state["best_metric"], improved=improved)
                _save_checkpoint(ckpt_path, {
                    "weights": [p.detach().cpu() for p in trainable],
                    "best_weights": [b.cpu() for b in best_weights],
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "rng_scales": objective.generator.get_state(), "state": state})
            if state["bad_evals"] >= settings.patience:
                stopped_early = True
                break
    bar.close()
    with torch.no_grad():
        for p, b in zip(trainable, best_weights):
            p.copy_(b)
    return LoopResult(state["best_metric"], state["best_step"], state["step"], time.time() - start, stopped_early)
