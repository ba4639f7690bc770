"""The trainers' run configuration (options: models/options.py)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from models.options import check_choice, option, parse_config
from training_scripts.objective import check_decoy_scale
from training_scripts.reporting import REPORTERS


@dataclass
class RunConfig:
    """What every trainer shares: the Trap² objective, LoRA, optimisation and bookkeeping."""

    # Trap² (paper CLI names); lambda_reg = 0 is the unprotected baseline
    lambda_reg: float = option(0.0, "Trap² weight λ of the off-scale term; 0 trains the unprotected baseline")
    rand_alpha_min: float = option(0.05, "s_min: smallest off scale sampled")
    rand_alpha_max: float = option(2.0, "s_max: largest off scale sampled (1 + band: only scales below 1)")
    band: float = option(0.05, "δ: scales within (1-δ, 1+δ) are never sampled")
    rand_alpha_weight: str = option("inv", "w(s) weighting the off-scale loss: inv (1/s), inv_sqrt (1/sqrt(s)) or none")
    scale_samples: int = option(1, "K: off scales sampled per step (the off-scale loss is their mean)")
    fixed_scales: list[float] | None = option(None, "use these off scales every step instead of sampling")
    off_loss_cap: float | None = option(
        None, "cap of each example's off-scale loss (math: each answer token's); none: the paper's unbounded term")
    lambda_ramp_steps: int = option(
        0, "steps over which λ (and a decoy's λ_d) rise linearly from 0, so the task is fitted before it is trapped; "
           "0: full λ from the first step (the paper)")
    # LoRA
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.1, "dropout on the LoRA input")
    use_dora: bool = option(
        False, "DoRA: a magnitude vector per output row besides B·A; Trap² scales B and the magnitude's change "
               "together (s = 0: the base), merges use ΔW = W − W0 in full or KnOTS space")
    lora_targets: list[str] | None = option(
        None, "module names carrying LoRA; default: the backbone's (q/k/v/out_proj, or fc1/fc2)")
    # optimisation
    lr: float | None = option(None, "peak learning rate; default: the trainer's (3e-4 LoRA, 1e-5 full; math 1e-4)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-6, "AdamW epsilon")
    batch_size: int = option(32, "examples per process and micro-batch")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    max_steps: int = option(10000, "optimiser steps at most")
    warmup_steps: int = option(500, "linear warm-up steps before the decay")
    schedule: str = option("cosine", "LR decay to 0 after warm-up: cosine or linear")
    schedule_steps: int | None = option(
        None, "steps the LR decay spans; default: max_steps (the release decays over 100,000 and stops early)")
    max_grad_norm: float | None = option(1.0, "gradient norm clip; none: no clipping")
    max_update_norm: float | None = option(
        None, "bound on ‖ΔW‖_F over all layers: after each step a larger update is scaled back onto it (so tasks "
              "end at like norms and none outweighs another in a merge); none: unbounded")
    eval_freq: int = option(2000, "steps between validation evaluations (and checkpoints)")
    patience: int = option(5, "evaluations without improvement before stopping early")
    min_delta: float = option(0.001, "smallest validation gain that counts as an improvement")
    amp: str = option("auto", "mixed precision: auto (fp16 + GradScaler on GPU, off on CPU), fp16, bf16 or none")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, slower)")
    eval_batch_size: int = option(256, "batch size of evaluation")
    # bookkeeping
    seed: int = option(420, "seed of initialisation, data order, dropout and sampled scales")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    output_dir: str | None = option(None, "run folder; default: runs/<suite>/<model>/<peft>/<task>-trap2|plain")
    overwrite: bool = option(False, "replace a finished or interrupted run in output_dir instead of refusing")
    progress: bool = option(True, "show a progress bar")
    report_to: str = option("none", "also log training metrics to: none, tensorboard or wandb (metrics.jsonl always)")
    push_to_hub: str | None = option(
        None, "after training (or for a finished run), upload the release to this Hub repo, owner/name (token: "
              "HF_TOKEN or `hf auth login`)")
    hub_private: bool = option(True, "create the Hub repo private")
    unprotected: dict | None = option(
        None, "settings that replace these for an unprotected run (λ = 0), e.g. the release's plain-trainer "
              "optimiser {weight_decay: 0.1, beta2: 0.999, eps: 1.0e-8, max_grad_norm: null}")

    def __post_init__(self) -> None:
        if self.unprotected:
            fields = {f.name for f in dataclasses.fields(self)} - {"lambda_reg", "unprotected"}
            unknown = set(self.unprotected) - fields
            if unknown:
                raise ValueError(f"--unprotected names unknown options {sorted(unknown)}")
            if self.lambda_reg == 0:
                for name, value in self.unprotected.items():
                    setattr(self, name, value)
        check_choice("amp", self.amp, ("auto", "fp16", "bf16", "none"))
        check_choice("report_to", self.report_to, REPORTERS)
        check_choice("schedule", self.schedule, ("cosine", "linear"))
        for name in ("batch_size", "grad_accum", "max_steps", "eval_freq", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        # NaN passes every comparison: a NaN λ would train an unprotected update recorded as protected
        for name in ("lambda_reg", "rand_alpha_min", "rand_alpha_max", "band", "off_loss_cap", "lr",
                     "weight_decay", "eps", "max_grad_norm", "max_update_norm", "min_delta", "lora_alpha",
                     "lora_dropout"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"--schedule_steps must be >= 1 (or none: max_steps), got {self.schedule_steps}")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ValueError(f"--max_update_norm must be > 0 (or none: unbounded), got {self.max_update_norm}")
        if self.max_update_norm is not None and self.use_dora:
            raise ValueError("--max_update_norm with --use_dora true: a DoRA update's norm is not bounded; drop one")
        if self.lambda_reg < 0:
            raise ValueError(f"--lambda_reg must be >= 0 (0 trains the unprotected baseline), got {self.lambda_reg}")
        if self.lambda_ramp_steps < 0:
            raise ValueError(f"--lambda_ramp_steps must be >= 0 (0: no ramp), got {self.lambda_ramp_steps}")

    @property
    def protected(self) -> bool:
        return self.lambda_reg > 0

    @property
    def learning_rate(self) -> float:
        """`lr`, or the trainer's default when it is None (each trainer defines its own)."""
        raise NotImplementedError


@dataclass
class TrainConfig(RunConfig):
    """One vision task update."""

    dataset: str = option("", "the task to train, e.g. gtsrb")
    suite: str = option("offline", "offline (generated data, runs anywhere) or vision8 (the paper's eight datasets)")
    model: str = option(
        "offline-vit", "backbone: offline-vit, offline-convnext, clip-vit-b32, clip-vit-l14, convnext-base-w")
    peft: str = option("lora", "lora or full (fine-tune every weight of the vision tower)")
    freeze_projection: bool = option(
        False, "full fine-tuning leaves the tower's output projection frozen (not trained, scaled or released), "
               "as the release does")
    # data and heads
    data_seed: int = option(0, "seed of the data splits and generated images")
    head_shots: int = option(16, "images per class for the zero-shot head (offline suite)")
    split_sizes: dict[str, int] | None = option(
        None, "offline: train/val/test sizes; vision8: caps for quick runs, e.g. {train: 320}")
    data_root: str | None = option(None, "vision8: where the datasets lie (default $TRAP2_DATASETS or data/datasets)")
    val_index_dir: str | None = option(None, "vision8: KnOTS <name>_shuffled_idxs.pt files for exact split parity")
    download: bool = option(False, "vision8: fetch the datasets whose hosts still serve them")
    num_workers: int | None = option(None, "data-loading processes (default: 0 in memory, up to 8 for files)")
    base_options: dict | None = option(
        None, "passed to the backbone builder (offline: recipe overrides, e.g. {steps: 50})")
    # decoy partners (a departure; none: the paper's objective)
    decoy_updates: list[str] | None = option(
        None, "update folders added beside the trained update in one more pass a step, W0 + ΔW + m·D, whose loss "
              "Trap² pushes up too (a merge partner at c ≈ 1); e.g. --shuffle_classes runs of the same task")
    random_decoys: bool = option(
        False, "decoys drawn afresh each step instead: per layer a random update reading the layer's 16 strongest "
               "input directions (this task's training images, at the base), as large as that layer's update in the "
               "task's own unprotected run (--random_decoys_like)")
    random_decoys_like: str | None = option(
        None, "the unprotected run that sizes random decoys (default: where the unprotected command puts it, "
              "runs/<suite>/<model>/<peft>/<task>-plain)")
    decoy_lambda: float = option(0.0, "weight λ_d of the decoy pass's loss (capped by off_loss_cap like the off-scale one)")
    decoy_scale: list[float] = option(help="m ~ U[lo, hi]: how much of a decoy is added", factory=lambda: [0.3, 0.7])
    init_update: str | None = option(
        None, "start from this released update of the task (a run folder, same base, kind and LoRA layers) instead of "
              "ΔW = 0: protect an existing fine-tune")
    shuffle_classes: int | None = option(
        None, "train against the task's class prototypes permuted by this seed: an unprotected decoy update that "
              "breaks the task's features as a merge partner's does, made from the task's own data")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("peft", self.peft, ("lora", "full"))
        if not (math.isfinite(self.decoy_lambda) and self.decoy_lambda >= 0):
            raise ValueError(f"--decoy_lambda must be a finite number >= 0, got {self.decoy_lambda}")
        check_decoy_scale(self.decoy_scale)
        if self.random_decoys_like and not self.random_decoys:
            raise ValueError("--random_decoys_like sizes random decoys: give --random_decoys true with it")
        if self.has_decoys != (self.decoy_lambda > 0):
            raise ValueError("--decoy_lambda > 0 and decoys go together (--decoy_updates, --random_decoys, or a "
                             "suite's --decoys): give both, or neither")
        if self.decoy_updates and self.random_decoys:
            raise ValueError("--decoy_updates and --random_decoys are two kinds of decoy: give one")
        if self.shuffle_classes is not None and self.protected:
            raise ValueError("--shuffle_classes trains a decoy, an unprotected update: use --lambda_reg 0")
        if self.init_update and self.use_dora:
            raise ValueError("--init_update with --use_dora true: starting a DoRA run from a release is not supported")
        check_choice("suite", self.suite, ("offline", "vision8"))
        if self.head_shots < 1:
            raise ValueError(f"--head_shots must be >= 1, got {self.head_shots}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.peft == "lora" else 1e-5)

    @property
    def has_decoys(self) -> bool:
        """Decoys are configured (they go with decoy_lambda > 0); only a protected run draws them."""
        return bool(self.decoy_updates) or self.random_decoys

    @property
    def draws_decoys(self) -> bool:
        """Whether training adds the decoy pass: an unprotected run leaves a YAML's decoys, like its λ, to the
        Trap² runs."""
        return self.protected and self.has_decoys

    @property
    def random_decoys_source(self) -> str | None:
        """The unprotected run that sizes this run's random decoys (None without random decoys)."""
        if not self.random_decoys:
            return None
        return self.random_decoys_like or str(self.default_run_dir(False))

    @property
    def decoy_sources(self) -> list[str]:
        """The run folders this run reads decoys from (so they train first): none unless it draws decoys."""
        if not self.draws_decoys:
            return []
        return list(self.decoy_updates or []) + ([self.random_decoys_source] if self.random_decoys else [])

    @property
    def source_runs(self) -> list[str]:
        """Every run folder this run reads (so those train first): its decoys' and the one it starts from."""
        return self.decoy_sources + ([self.init_update] if self.init_update else [])

    def default_run_dir(self, protected: bool) -> Path:
        """Where this task's run goes without --output_dir: runs/<suite>/<model>/<peft>/<task>-trap2|plain."""
        return Path("runs") / self.suite / self.model / self.peft / run_name(self.dataset, protected)

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else self.default_run_dir(self.protected)


def run_name(task: str, protected: bool) -> str:
    """`<task>-trap2` or `<task>-plain`: the one spelling of a run folder's name."""
    return f"{task}-{'trap2' if protected else 'plain'}"


# The release's CLI default λ, in every trainer (reference spec §2)
RELEASE_LAMBDA = 0.01


def parse_run_config(cls, argv=None, description: str = "", protected: bool | None = None,
                     defaults: dict | None = None):
    """A trainer's options. `protected` is the paper aliases' choice: True trains Trap² (λ from the flags or
    YAML, else the release's 0.01; λ = 0 is refused), False the unprotected baseline (λ = 0 whatever the
    YAML says: a suite YAML's λ belongs to its protected runs), None takes λ as given."""
    defaults = {**({"lambda_reg": RELEASE_LAMBDA} if protected else {}), **(defaults or {})}
    fixed = {"lambda_reg": 0.0} if protected is False else None
    cfg = parse_config(cls, argv, description, defaults, fixed)
    if protected and not cfg.protected:
        raise SystemExit(f"error: this command trains a Trap²-protected update; --lambda_reg must be > 0, "
                         f"got {cfg.lambda_reg}")
    return cfg


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
