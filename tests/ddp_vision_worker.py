"""Run under torchrun by tests/test_training.py: trains a tiny vision LoRA update (Trap²) on CPU processes
and records a hash of this process's trainable weights after every step."""
import hashlib
import json
import sys

from conftest import tiny_train_args
from models import distributed
from training_scripts.config import TrainConfig
from training_scripts.vision import train_vision

out = sys.argv[1]
cfg = TrainConfig(**tiny_train_args(f"{out}/run", lambda_reg=0.1, max_steps=4, eval_freq=2, batch_size=8,
                                    device="cpu"))
hashes = []


def record(step, params):
    hashes.append(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest())


train_vision(cfg, on_step=record)
with open(f"{out}/rank{distributed.rank()}.json", "w") as fh:
    json.dump({"hashes": hashes, "world": distributed.world_size()}, fh)
