"""Run under torchrun by tests/test_hf_trainer.py: Trap2Trainer on two CPU processes (the Trainer's own DDP,
gloo); records a hash of this process's LoRA weights after every optimiser step."""
import sys

import torch
from transformers import TrainerCallback, TrainingArguments

from conftest import record_weights_per_step
from test_hf_trainer import TRAP2, _batch, _model
from training_scripts.hf_trainer import Trap2Trainer

out = sys.argv[1]
on_step, write = record_weights_per_step(out)
model = _model()


class Record(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        on_step(state.global_step, [p for p in model.parameters() if p.requires_grad])


data = [{k: v[0] for k, v in _batch(i).items()} for i in range(16)]
args = TrainingArguments(output_dir=f"{out}/trainer", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                         ddp_backend="gloo")
Trap2Trainer(model=model, args=args, train_dataset=data, trap2=TRAP2, callbacks=[Record()]).train()
write()
# the Trainer (accelerate) leaves its gloo group up; tear it down here, not in the interpreter's exit
torch.distributed.destroy_process_group()
