"""What every trainer does around the loop: the run folder (refuse, resume or reuse), seeding,
the device, and the Trap² objective and loop settings built from a RunConfig."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from models import distributed
from models.hub import push_release
from models.storage import FolderLock, LOCK_FILE
from models.updates import METADATA_FILE
from training_scripts.config import RunConfig, config_dict
from training_scripts.loop import CHECKPOINT, LoopSettings, resolve_amp
from training_scripts.objective import ScaleSampler, Trap2Objective

SETTINGS_FILE = "run_settings.json"  # written at start, so a resumed run can check it continues the same run
# `unprotected` is already applied into the other fields of an unprotected run and unused by a Trap² one
BOOKKEEPING = {"output_dir", "overwrite", "progress", "device", "data_root", "download", "num_workers",
               "eval_batch_size", "push_to_hub", "hub_private", "report_to", "unprotected"}
TRAP2_ONLY = {"rand_alpha_min", "rand_alpha_max", "band", "rand_alpha_weight", "scale_samples", "fixed_scales",
              "off_loss_cap", "lambda_ramp_steps", "decoy_updates", "random_decoys", "random_decoys_like",
              "decoy_lambda", "decoy_scale"}
# folders compared by the weights they hold (the metadata key recording those) once those are recorded
SOURCE_FOLDERS = {"decoy_weights": {"decoy_updates", "random_decoys_like"}, "init_weights": {"init_update"}}


def differing_settings(saved: dict, current: dict, defaults: dict) -> dict:
    """Settings that change the result; fields a saved run predates count as their defaults."""
    ignored = BOOKKEEPING | (TRAP2_ONLY if saved.get("lambda_reg") == current.get("lambda_reg") == 0 else set())
    return {k: (saved.get(k, defaults.get(k)), v) for k, v in current.items()
            if k not in ignored and saved.get(k, defaults.get(k)) != v}


_LOCKS: dict[Path, FolderLock] = {}  # run folders this process writes


def open_run_dir(cfg: RunConfig, out_dir: Path, write: bool = True,
                 source_weights: dict | None = None) -> bool:
    """Prepares `out_dir` for `cfg`; True when it already holds this finished run (nothing to do).

    A folder holding another run (finished or interrupted) with other settings is refused rather
    than silently reused; --overwrite replaces it. A folder another live process writes is refused,
    --overwrite included. `write`: False on the non-main processes. `source_weights`: SOURCE_FOLDERS' keys to the
    content hashes of the updates the run reads; a saved run that recorded the same ones matches wherever they
    now lie.
    """
    if write:
        release_run_dir(out_dir)  # this process's own earlier attempt, ended by an exception
        _LOCKS[out_dir] = FolderLock(out_dir)
    finished = (out_dir / METADATA_FILE).exists() and not (out_dir / CHECKPOINT).exists()
    if cfg.overwrite and out_dir.exists():
        if write:
            for child in out_dir.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif finished or (out_dir / CHECKPOINT).exists():
        meta_path = out_dir / (METADATA_FILE if finished else SETTINGS_FILE)
        saved = json.loads(meta_path.read_text()) if meta_path.exists() else {"config": config_dict(cfg)}
        differing = differing_settings(saved["config"], config_dict(cfg), config_dict(type(cfg)()))
        # the same source weights in other folders: runs moved together, e.g. to another --runs_root
        for key, weights in (source_weights or {}).items():
            if saved.get(key) == weights:
                differing = {k: v for k, v in differing.items() if k not in SOURCE_FOLDERS[key]}
        if differing:
            raise ValueError(f"{out_dir} holds a run with other settings ({differing}); pass --overwrite true "
                             f"to replace it or choose another --output_dir")
        if finished:
            print(f"{out_dir} already holds this finished update; pass --overwrite true to retrain")
            release_run_dir(out_dir)
            return True
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = {"config": config_dict(cfg), **(source_weights or {})}
        (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return False


def release_run_dir(out_dir: Path) -> None:
    lock = _LOCKS.pop(out_dir, None)
    if lock is not None:
        lock.release()


def close_run_dir(out_dir: Path) -> None:
    """After the update and its metadata are saved: the checkpoint and settings file are spent."""
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    (out_dir / SETTINGS_FILE).unlink(missing_ok=True)  # the metadata now holds the settings
    release_run_dir(out_dir)


def publish(cfg: RunConfig, out_dir: Path) -> None:
    """--push_to_hub: the finished release goes to the Hub (from the main process only)."""
    if cfg.push_to_hub and distributed.is_main():
        print(f"uploaded {out_dir} to {push_release(out_dir, cfg.push_to_hub, cfg.hub_private)}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training examples' order in an epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the batches an uninterrupted one would have seen."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def build_objective(cfg: RunConfig) -> Trap2Objective:
    """The Trap² objective of a run's settings (any object with RunConfig's objective fields)."""
    return Trap2Objective(cfg.lambda_reg, ScaleSampler(cfg.rand_alpha_min, cfg.rand_alpha_max, cfg.band),
                          cfg.rand_alpha_weight, cfg.scale_samples, cfg.fixed_scales, seed=cfg.seed + 1,
                          off_loss_cap=cfg.off_loss_cap, lambda_ramp_steps=cfg.lambda_ramp_steps)


def loop_settings(cfg: RunConfig, device: torch.device, auto_amp: str = "fp16") -> LoopSettings:
    return LoopSettings(
        lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
        max_update_norm=cfg.max_update_norm, eval_freq=cfg.eval_freq, patience=cfg.patience,
        min_delta=cfg.min_delta,
        amp=resolve_amp(cfg.amp, device, auto_amp), progress=cfg.progress, schedule=cfg.schedule,
        grad_accum=cfg.grad_accum, schedule_steps=cfg.schedule_steps, report_to=cfg.report_to,
        run_config=config_dict(cfg))
