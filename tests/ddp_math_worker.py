"""Run under torchrun by tests/test_math.py: trains a tiny math LoRA update (Trap², gradient
accumulation) on CPU processes and records a hash of this process's LoRA weights after every step."""
import json
import sys

from conftest import record_weights_per_step
from training_scripts.math import MathConfig, train_math

out, model_options = sys.argv[1], json.loads(sys.argv[2])
cfg = MathConfig(task="offline-gsm8k", model="offline-llama", model_options=model_options, lambda_reg=0.1,
                 split_sizes={"train": 40, "val": 4, "test": 4}, max_steps=4, eval_freq=2, batch_size=2,
                 grad_accum=2, warmup_steps=1, lr=1e-2, max_new_tokens=4, device="cpu", output_dir=f"{out}/run",
                 progress=False, report_scales=[1.0])
on_step, write = record_weights_per_step(out)
train_math(cfg, on_step=on_step)
write()
