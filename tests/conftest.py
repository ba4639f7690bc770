"""Shared fixtures: a tiny offline base and tiny task splits, so end-to-end runs take seconds."""
import os
from pathlib import Path

import pytest

# Caches go to a per-session folder unless CI points TRAP2_DATA somewhere on purpose.
os.environ.setdefault("TRAP2_DATA", str(Path(__file__).resolve().parent.parent / "data"))

TINY_BASE = {"steps": 15, "pretext_train": 256, "batch_size": 32, "warmup": 5}
TINY_SPLITS = {"train": 160, "val": 64, "test": 64}


def tiny_train_args(out_dir, dataset="gtsrb", lambda_reg=0.0, peft="lora", model="offline-vit", **extra):
    args = dict(dataset=dataset, model=model, peft=peft, lambda_reg=lambda_reg, base_options=dict(TINY_BASE),
                split_sizes=dict(TINY_SPLITS), max_steps=8, eval_freq=4, warmup_steps=2, batch_size=16,
                lr=3e-3, head_shots=4, output_dir=str(out_dir), progress=False, seed=420)
    args.update(extra)
    return args


@pytest.fixture(scope="session")
def trained_updates(tmp_path_factory):
    """Three tiny LoRA updates: gtsrb protected, gtsrb plain, mnist plain."""
    from training_scripts.config import TrainConfig
    from training_scripts.vision import train_vision

    root = tmp_path_factory.mktemp("runs")
    paths = {
        "gtsrb-trap2": train_vision(TrainConfig(**tiny_train_args(root / "gtsrb-trap2", lambda_reg=0.1))),
        "gtsrb-plain": train_vision(TrainConfig(**tiny_train_args(root / "gtsrb-plain"))),
        "mnist-plain": train_vision(TrainConfig(**tiny_train_args(root / "mnist-plain", dataset="mnist"))),
    }
    return paths
