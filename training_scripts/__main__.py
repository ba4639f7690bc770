"""python -m training_scripts --dataset gtsrb [--peft lora|full] [--lambda_reg 0.01] [--config file.yaml] ..."""
from __future__ import annotations

from training_scripts.config import TrainConfig, parse_config
from training_scripts.vision import train_vision


def main(argv=None, defaults: dict | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, "Train one task update (LoRA or full), protected with Trap² when "
                       "--lambda_reg > 0.", defaults)
    train_vision(cfg)


if __name__ == "__main__":
    main()
