"""Trap² inside transformers' Trainer: protect your own PEFT (or fully fine-tuned) model with the Trainer you
already use. The step back-propagates J = L(W0 + ΔW) − λ·E_s[w(s)·L(W0 + s·ΔW)] through the one objective
(training_scripts/objective.py) instead of the plain loss; everything else (optimiser, schedule, gradient
accumulation, AMP, logging, saving) stays the Trainer's.

    trainer = Trap2Trainer(model=peft_model, args=TrainingArguments(...), train_dataset=data,
                           trap2=Trap2Config(lambda_reg=0.01))
    trainer.train()

Any Trainer subclass gets the same step: `with_trap2(trl.SFTTrainer)(model=..., args=SFTConfig(...), ...)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import Trainer

from models.causal_lm import answer_token_cross_entropy
from models.updates import ScaledUpdate
from training_scripts.runs import build_objective


@dataclass
class Trap2Config:
    """The objective's settings, named as everywhere else in the project (see RunConfig)."""

    lambda_reg: float = 0.01
    rand_alpha_min: float = 0.05
    rand_alpha_max: float = 2.0
    band: float = 0.05
    rand_alpha_weight: str = "inv"
    scale_samples: int = 1
    fixed_scales: list[float] | None = None
    off_loss_cap: float | None = None
    lambda_ramp_steps: int = 0
    seed: int = 0  # the scale draws use seed + 1, as in our trainers


NOT_MODEL_INPUTS = {"labels", "completion_mask", "assistant_masks"}  # what TRL's collators add for the loss


def per_example_loss(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One loss per example from a model's logits and `labels`: cross-entropy per sequence-classification
    example, or per answer token for a causal LM (labels -100 are ignored), as the objective requires."""
    features = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
    logits, labels = model(**features).logits, inputs["labels"]
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    return answer_token_cross_entropy(logits, labels)


class Trap2Mixin:
    """Makes a `transformers.Trainer` (or a subclass such as TRL's `SFTTrainer`) accumulate the gradient of
    Trap²'s J in its training step; see `with_trap2`.

    The update is the model's trainable LoRA B matrices (and DoRA magnitudes) when it has any (PEFT), else
    every trainable parameter (full fine-tuning, anchored at its values when training starts).
    `loss_fn(model, inputs)` returns one loss per example (default: `per_example_loss`).
    """

    def __init__(self, *args, trap2: Trap2Config | None = None,
                 loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] = per_example_loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.trap2 = trap2 or Trap2Config()
        self.objective = build_objective(self.trap2)
        self.trap2_loss_fn = loss_fn
        self._update: ScaledUpdate | None = None

    def update_of(self, model: torch.nn.Module) -> ScaledUpdate:
        if self._update is None:
            has_lora = any(".lora_B." in n and p.requires_grad for n, p in model.named_parameters())
            self._update = ScaledUpdate.lora(model) if has_lora else ScaledUpdate.full(model)
        return self._update

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scaler = getattr(self.accelerator, "scaler", None)

        def scale_loss(loss: torch.Tensor) -> torch.Tensor:  # each micro-batch gives 1/steps of the step
            loss = loss / steps if steps > 1 else loss
            return scaler.scale(loss) if scaler is not None else loss

        metrics = self.objective.backward(model, self.update_of(model), self.trap2_loss_fn, inputs,
                                          scale_loss=scale_loss, autocast=self.compute_loss_context_manager,
                                          step=self.state.global_step)
        return torch.tensor(metrics["objective" if "objective" in metrics else "loss"] / steps,
                            device=self.args.device)


_WITH_TRAP2: dict[type, type] = {}


def with_trap2(trainer_class: type[Trainer]) -> type[Trainer]:
    """The Trap² version of a Trainer class, e.g. `with_trap2(trl.SFTTrainer)`; it takes `trap2=Trap2Config(...)`."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_trap2 takes a transformers.Trainer subclass, got {trainer_class!r}")
    if trainer_class not in _WITH_TRAP2:
        _WITH_TRAP2[trainer_class] = type(f"Trap2{trainer_class.__name__}", (Trap2Mixin, trainer_class), {})
    return _WITH_TRAP2[trainer_class]


Trap2Trainer = with_trap2(Trainer)
