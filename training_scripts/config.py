"""Run configuration: dataclass defaults < YAML file (--config) < command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    """What every trainer shares: the Trap² objective, LoRA, optimisation and bookkeeping."""

    # Trap² (paper CLI names); lambda_reg = 0 is the unprotected baseline
    lambda_reg: float = 0.0
    rand_alpha_min: float = 0.05
    rand_alpha_max: float = 2.0
    band: float = 0.05
    rand_alpha_weight: str = "inv"  # inv | inv_sqrt | none
    scale_samples: int = 1
    fixed_scales: list[float] | None = None
    # cap of each example's off-scale loss (math: of the batch's); None: the paper's unbounded term
    off_loss_cap: float | None = None
    # LoRA
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: list[str] | None = None  # default: the backbone's (q/k/v/out_proj, or fc1/fc2)
    # optimisation
    lr: float | None = None  # default 3e-4 for LoRA, 1e-5 for full
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    batch_size: int = 32  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 10000
    warmup_steps: int = 500
    schedule: str = "cosine"  # cosine | linear (decay to 0 after warm-up)
    max_grad_norm: float = 1.0
    eval_freq: int = 2000
    patience: int = 5
    min_delta: float = 0.001
    amp: str = "auto"  # auto (fp16 + GradScaler on GPU, off on CPU) | fp16 | bf16 | none
    gradient_checkpointing: bool = False
    eval_batch_size: int = 256
    # bookkeeping
    seed: int = 420
    device: str = "auto"
    output_dir: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "fp16", "bf16", "none"):
            raise ValueError(f"--amp must be auto, fp16, bf16 or none, got {self.amp!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"--schedule must be cosine or linear, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_freq", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        # NaN passes every comparison: a NaN λ would train an unprotected update recorded as protected
        for name in ("lambda_reg", "rand_alpha_min", "rand_alpha_max", "band", "off_loss_cap", "lr",
                     "weight_decay", "eps", "max_grad_norm", "min_delta", "lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        if self.lambda_reg < 0:
            raise ValueError(f"--lambda_reg must be >= 0 (0 trains the unprotected baseline), got {self.lambda_reg}")

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

    dataset: str = ""
    suite: str = "offline"
    model: str = "offline-vit"
    peft: str = "lora"  # lora | full
    # data and heads
    data_seed: int = 0
    head_shots: int = 16
    split_sizes: dict[str, int] | None = None  # offline: train/val/test sizes; vision8: caps for quick runs
    data_root: str | None = None  # vision8: where the datasets lie (default $TRAP2_DATASETS or data/datasets)
    val_index_dir: str | None = None  # vision8: KnOTS <name>_shuffled_idxs.pt files for exact split parity
    download: bool = False  # vision8: fetch the datasets whose hosts still serve them
    num_workers: int | None = None  # data-loading processes (default: 0 in memory, up to 8 for files)
    base_options: dict | None = None  # passed to the backbone builder (offline: recipe overrides, e.g. {steps: 50})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft not in ("lora", "full"):
            raise ValueError(f"--peft must be lora or full, got {self.peft!r}")
        if self.suite not in ("offline", "vision8"):
            raise ValueError(f"--suite must be offline or vision8, got {self.suite!r}")
        if self.head_shots < 1:
            raise ValueError(f"--head_shots must be >= 1, got {self.head_shots}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.peft == "lora" else 1e-5)

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        tag = "trap2" if self.protected else "plain"
        return Path("runs") / self.suite / self.model / self.peft / f"{self.dataset}-{tag}"


def _yaml_mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as '{{key: value}}', got {text!r}")
    return value


_yaml_mapping.__name__ = "mapping"  # argparse names it in "invalid ... value"


def _arg_type(tp: Any):
    """argparse type and nargs for a dataclass field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner_type, nargs = _arg_type(next(a for a in args if a is not type(None)))
        if nargs is not None or type(None) not in args:
            return inner_type, nargs
        # "none" on the command line undoes a YAML value (e.g. --off_loss_cap none: the unbounded term)
        def optional(text: str):
            return None if text.lower() == "none" else inner_type(text)
        optional.__name__ = f"{inner_type.__name__} or none"  # argparse names it in "invalid ... value"
        return optional, None
    if origin is list:
        return args[0], "+"
    if origin is dict or tp is dict:  # a YAML mapping on the command line, e.g. --base_options '{steps: 50}'
        return _yaml_mapping, None
    if tp is bool:
        return lambda s: str(s).lower() in ("1", "true", "yes", "on"), None
    return tp, None


def parse_config(cls, argv=None, description: str = "", defaults: dict | None = None,
                 yaml_ignores: frozenset[str] = frozenset()):
    """Builds `cls` from its defaults, then `defaults`, then a YAML --config, then flags.

    `yaml_ignores`: keys a YAML file may hold for a wider command (a suite config used for one run).
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, nargs = _arg_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", type=tp, nargs=nargs, default=argparse.SUPPRESS,
                            help=f"(default: {default})")
    ns = vars(parser.parse_args(argv))
    values = dict(defaults or {})
    config_path = ns.pop("config", None)
    if config_path is not None:
        if not config_path.exists():
            parser.error(f"config file {config_path} does not exist")
        loaded = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{config_path} must hold a mapping of option: value")
        unknown = set(loaded) - {f.name for f in dataclasses.fields(cls)} - yaml_ignores
        if unknown:
            parser.error(f"{config_path}: unknown options {sorted(unknown)}")
        values.update({k: v for k, v in loaded.items() if k not in yaml_ignores})
    values.update(ns)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
