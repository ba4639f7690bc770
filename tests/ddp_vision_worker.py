"""Run under torchrun by tests/test_training.py: trains a tiny vision LoRA update (Trap²) on CPU processes
and records a hash of this process's trainable weights after every step."""
import sys

from conftest import record_weights_per_step, tiny_train_args
from training_scripts.config import TrainConfig
from training_scripts.vision import train_vision

out = sys.argv[1]
on_step, write = record_weights_per_step(out)
train_vision(TrainConfig(**tiny_train_args(f"{out}/run", lambda_reg=0.1, max_steps=4, eval_freq=2, batch_size=8,
                                           device="cpu")), on_step=on_step)
write()
