"""python -m training_scripts --dataset gtsrb [--peft lora|full] [--lambda_reg 0.01] [--config file.yaml] ..."""
from __future__ import annotations

import dataclasses

from training_scripts.config import TrainConfig, parse_config
from training_scripts.suite import SuiteConfig
from training_scripts.vision import train_vision

SUITE_ONLY = frozenset(f.name for f in dataclasses.fields(SuiteConfig)) - {f.name for f in dataclasses.fields(TrainConfig)}


def main(argv=None, defaults: dict | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, "Train one task update (LoRA or full), protected with Trap² when "
                       "--lambda_reg > 0. A suite's YAML (configs/...) works too: its suite-only keys are ignored.",
                       defaults, yaml_ignores=SUITE_ONLY)
    train_vision(cfg)


if __name__ == "__main__":
    main()
