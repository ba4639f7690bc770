"""python -m training_scripts --dataset gtsrb [--peft lora|full] [--lambda_reg 0.01] [--config file.yaml] ..."""
from __future__ import annotations

from models.runtime import run_cli
from training_scripts.config import TrainConfig, parse_run_config
from training_scripts.runs import publish
from training_scripts.vision import train_vision


def main(argv=None, protected: bool | None = None, defaults: dict | None = None) -> None:
    """`protected`, `defaults`: set by the paper's command names (True: Trap², False: the unprotected baseline)."""
    cfg = parse_run_config(TrainConfig, argv, "Train one task update (LoRA or full), protected with Trap² when "
                           "--lambda_reg > 0 (a suite YAML's lambda_reg is the protected runs' λ).", protected, defaults)
    publish(cfg, train_vision(cfg))


if __name__ == "__main__":
    run_cli(main)
