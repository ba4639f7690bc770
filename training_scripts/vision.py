"""Vision trainer: one code path for LoRA and full updates, protected (λ > 0) or not, any backbone."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dataset.vision import prefetched
from models import distributed
from models.backbones import load_base
from models.layer_inputs import layer_input_grams
from models.runtime import pin_threads, provenance, resolve_device
from models.updates import ReleasedUpdate, ScaledUpdate, load_update, save_update
from models.vision import DataSettings, classifier_for, evaluate, load_task
from training_scripts.config import TrainConfig, config_dict
from training_scripts.loop import run_loop
from training_scripts.objective import DecoyPartners, RandomDecoys
from training_scripts.runs import (build_objective, close_run_dir, epoch_order, loop_settings, open_run_dir,
                                   seed_everything)

# peft asks transformers' deprecated spelling on every adapter it attaches; nothing for a user to act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)

REPORT_SCALES = (0.0, 0.125, 0.5, 1.0)  # s = 0 is the frozen base; 1/8 and 1/2 are merge-like scales
RANDOM_DECOY_DIRECTIONS = 16  # the LoRA rank: a partner's update reads about that many input directions
RANDOM_DECOY_IMAGES = 512  # training images whose layer inputs give those directions


def attach_update(model: torch.nn.Module, cfg: TrainConfig) -> ScaledUpdate:
    """Makes the backbone's update trainable (LoRA adapter or all weights) and returns it."""
    backbone = model.backbone
    if cfg.peft == "lora":
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets or list(backbone.spec.lora_targets)
        if cfg.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        backbone.net = get_peft_model(backbone.net, LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets, bias="none", use_dora=cfg.use_dora))
        return ScaledUpdate.lora(model)
    frozen = set(backbone.spec.projection) if cfg.freeze_projection else set()
    for name, p in backbone.net.named_parameters():
        p.requires_grad_(name not in frozen)
    if cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    return ScaledUpdate.full(model)


class StepBatches:
    """batch_at(step): epoch-wise permutations seeded by (seed, epoch), last partial batch dropped; under
    torchrun each process takes global batch step · world + rank (its shard of the step's examples).

    Steps are asked for in order, so the batches of the current epoch stream from `prefetched`
    (workers prepare them ahead); a jump (resuming mid-epoch) restarts the stream at that step.
    """

    def __init__(self, task, batch_size: int, seed: int, num_workers: int, device: torch.device):
        self.task, self.batch_size, self.seed, self.workers, self.device = task, batch_size, seed, num_workers, device
        self.n_train = task.size("train")
        self.per_epoch = max(1, self.n_train // batch_size)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.next_step, self.stream, self.epoch = None, None, None

    def _start(self, step: int) -> None:
        first = step * self.world + self.rank
        self.epoch = first // self.per_epoch
        order = epoch_order(self.n_train, self.seed, self.epoch)
        ends = range(first, (self.epoch + 1) * self.per_epoch, self.world)  # this process's batches of the epoch
        chunks = [order[(g % self.per_epoch) * self.batch_size:(g % self.per_epoch + 1) * self.batch_size]
                  for g in ends]
        self.stream = prefetched(self.task, "train", chunks, self.workers, self.device.type == "cuda")

    def __call__(self, step: int):
        if step != self.next_step or (step * self.world + self.rank) // self.per_epoch != self.epoch:
            self._start(step)
        self.next_step = step + 1
        x, y = next(self.stream)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def class_permutation(n_classes: int, seed: int) -> torch.Tensor:
    """The fixed class permutation of a --shuffle_classes decoy."""
    return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed))


def decoy_deltas(decoy: ReleasedUpdate, base) -> dict[str, torch.Tensor]:
    """A decoy partner's ΔW per base weight: a released update, checked against this base like any."""
    decoy.check_base(base.fingerprint, dict(base.backbone.net.state_dict()))
    return {name: decoy.delta(name).detach().float() for name in decoy.names()}


def random_decoy_layers(cfg: TrainConfig, sizing: ReleasedUpdate, base, model, task, device) -> tuple[dict, dict]:
    """What RandomDecoys needs, read at the base before the update is attached: the input Gram and the sizing
    run's (`cfg.random_decoys_source`) ‖ΔW‖_F of every linear layer that update changes."""
    reference = decoy_deltas(sizing, base)

    def feed():
        for x, _ in task.batches("train", cfg.eval_batch_size, RANDOM_DECOY_IMAGES):
            model(x.to(device))

    was_training = model.training
    model.eval()
    grams = layer_input_grams(model.backbone.net, list(reference), feed)
    model.train(was_training)
    if not grams:
        raise ValueError(f"random decoys sized by {cfg.random_decoys_source}: that update changes no linear layer")
    return grams, {name: float(reference[name].norm()) for name in grams}


def scale_report(model, update: ScaledUpdate, task, split: str, cfg: TrainConfig, device) -> dict[str, dict]:
    out = {}
    for s in REPORT_SCALES:
        with update.set_scale(s):
            out[f"{s:g}"] = evaluate(model, task, split, cfg.eval_batch_size, device)
    return out


def train_vision(cfg: TrainConfig, on_step: Callable[[int, list], None] | None = None) -> Path:
    """Trains one update and saves it (with metadata and metrics) to the output folder. Under torchrun /
    accelerate launch, data parallel: each process a shard of every batch, gradients averaged, so every
    process holds the same weights; the main process writes. `on_step(step, params)`: after each step."""
    if not cfg.dataset:
        raise ValueError("--dataset is required (e.g. --dataset gtsrb)")
    if cfg.suite == "vision8":  # fail on missing data before loading (large) weights
        from dataset.vision8 import check_dataset

        check_dataset(cfg.dataset, cfg.data_root, cfg.download)
    device = distributed.init_from_env(resolve_device(cfg.device))
    main = distributed.is_main()
    out_dir = cfg.resolved_output_dir()
    sources = {folder: load_update(folder) for folder in cfg.source_runs}  # read once: their weights identify the run
    source_weights = {"decoy_weights": [sources[folder].content_hash for folder in cfg.decoy_sources],
                      "init_weights": sources[cfg.init_update].content_hash if cfg.init_update else None}
    if open_run_dir(cfg, out_dir, write=main, source_weights=source_weights):
        return out_dir
    distributed.barrier()
    pin_threads(device)
    seed_everything(cfg.seed)
    base = load_base(cfg.model, cfg.base_options, device)
    data = DataSettings.from_config(config_dict(cfg))
    task = load_task(base, cfg.dataset, data)
    model = classifier_for(base, task, data)
    if cfg.shuffle_classes is not None:  # class c's images must land on class π(c)'s prototype
        model.head = model.head[class_permutation(len(task.classes), cfg.shuffle_classes).to(model.head.device)]
    # read before PEFT wraps the net
    partners = [decoy_deltas(sources[folder], base) for folder in cfg.decoy_updates or []] if cfg.draws_decoys else []
    random_layers = (random_decoy_layers(cfg, sources[cfg.random_decoys_source], base, model, task, device)
                     if cfg.draws_decoys and cfg.random_decoys else None)
    start = sources[cfg.init_update] if cfg.init_update else None
    if start is not None:
        if start.task != cfg.dataset:
            raise ValueError(f"--init_update {cfg.init_update} is a {start.task} update; this run trains {cfg.dataset}")
        start.check_base(base.fingerprint, dict(base.backbone.net.state_dict()))
    seed_everything(cfg.seed)  # the adapter's initialisation must not depend on cache state
    update = attach_update(model, cfg)
    model.to(device)
    if cfg.peft == "full":  # anchors were cloned before the move
        update.anchors = {n: a.to(device) for n, a in update.anchors.items()}
    if start is not None:
        update.start_from(model, start, prefix="backbone.net.")

    objective = build_objective(cfg)
    if partners:
        objective.attach_decoys(DecoyPartners(model.backbone.net, partners, cfg.decoy_scale), cfg.decoy_lambda)
    if random_layers:  # built on the wrapped net, as DecoyPartners: D adds outside a DoRA layer's rescaling
        objective.attach_decoys(RandomDecoys(model.backbone.net, *random_layers, cfg.decoy_scale,
                                             RANDOM_DECOY_DIRECTIONS), cfg.decoy_lambda)
    if not cfg.gradient_checkpointing:
        objective.replay_dropout(model)
    batch_at = StepBatches(task, cfg.batch_size, cfg.seed, data.workers(), device)

    def loss_fn(forward, batch):
        x, y = batch
        return F.cross_entropy(forward(x).float(), y, reduction="none")

    with model.backbone.class_token_readout():  # the loss reads the class token only: skip the rest's last layer
        result = run_loop(model, update, objective, loss_fn, batch_at,
                          lambda: evaluate(model, task, "val", cfg.eval_batch_size, device)["accuracy"],
                          loop_settings(cfg, device), out_dir, device, on_step)
    if not main:  # the main process evaluates and saves the (identical) update
        distributed.barrier()
        return out_dir

    val = evaluate(model, task, "val", cfg.eval_batch_size, device)
    test_by_scale = scale_report(model, update, task, "test", cfg, device)
    metadata = {
        "task": cfg.dataset, "suite": cfg.suite, "base_model": cfg.model, "base_options": base.options,
        "base_fingerprint": base.fingerprint, "n_classes": len(task.classes), "protected": cfg.protected,
        "lambda_reg": cfg.lambda_reg, "seed": cfg.seed, "config": config_dict(cfg), **source_weights,
        "val_accuracy": val["accuracy"], "test_accuracy": test_by_scale["1"]["accuracy"],
        "zero_shot_test_accuracy": test_by_scale["0"]["accuracy"],
        "test_by_scale": test_by_scale, "best_step": result.best_step, "steps_run": result.steps_run,
        "stopped_early": result.stopped_early, "train_seconds": round(result.seconds, 1),
        "processes": distributed.world_size(), "provenance": provenance(base.fingerprint),
    }
    save_update(out_dir, model.backbone.net, update, metadata, prefix="backbone.net.")
    close_run_dir(out_dir)
    distributed.barrier()
    summary = {k: metadata[k] for k in ("task", "protected", "val_accuracy", "test_accuracy", "zero_shot_test_accuracy")}
    summary["test_accuracy_by_scale"] = {s: round(r["accuracy"], 4) for s, r in test_by_scale.items()}
    print(json.dumps(summary))
    return out_dir
