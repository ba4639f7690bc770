"""PEFT as the attacker: LoRA adapters merged by `PeftModel.add_weighted_adapter`, as LoRA users run it.

Its combination types are spaces none of ours covers: `linear` and the pruning types merge the A and B
factors separately (each weighted by √w, so cross terms B_i·A_j appear), `cat` stacks the ranks, and the
`*_svd` types merge ΔW and truncate it back to rank r. The merged adapter's ΔW per layer is read back and
put on the base by our evaluator (equal to running PEFT's merged model; tests/test_peft_merge.py).

Every type is homogeneous of degree 1 in the weights (each factor scales by √w), so the merge is made once
at the task coefficients and the global coefficient c scales it, as for our own methods.
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel

from models.updates import LoraFactors, ReleasedUpdate, UpdateError
from task_merger import check_same_base, get_merge_method

MERGED = "merged"


def adapter_config(update: ReleasedUpdate) -> LoraConfig:
    """The LoRA config of a loaded update, from its validated factors (never from its own config file)."""
    modules = {name.removesuffix(".weight"): f for name, f in update.lora.items()}
    ranks = {m: f.A.shape[0] for m, f in modules.items()}
    rank = max(ranks.values())
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(modules), lora_dropout=0.0,
                      rank_pattern={f"^{m}$": r for m, r in ranks.items()},
                      alpha_pattern={f"^{m}$": f.scaling * ranks[m] for m, f in modules.items()})


def peft_model(template: torch.nn.Module, updates: Sequence[ReleasedUpdate]) -> PeftModel:
    """A copy of the base with every update loaded as its own adapter (`task0`, `task1`, …)."""
    model = None
    for i, u in enumerate(updates):
        if model is None:
            model = PeftModel(copy.deepcopy(template), adapter_config(u), adapter_name=f"task{i}")
        else:
            model.add_adapter(f"task{i}", adapter_config(u))
        inner = model.base_model.model
        with torch.no_grad():
            for name, f in u.lora.items():
                layer = inner.get_submodule(name.removesuffix(".weight"))
                layer.lora_A[f"task{i}"].weight.copy_(f.A)
                layer.lora_B[f"task{i}"].weight.copy_(f.B)
    model.eval()
    return model


class PeftMerger:
    """Merges LoRA updates with PEFT (methods `peft_<combination_type>`); the same `merge` as TaskMerger."""

    def __init__(self, updates: Sequence[ReleasedUpdate], template: torch.nn.Module,
                 task_coefficients: Sequence[float] | None = None, seed: int = 0):
        if not updates:
            raise ValueError("nothing to merge: pass at least one update")
        for u in updates:
            if any(not isinstance(f, LoraFactors) for f in u.lora.values()):
                raise UpdateError(f"{u.path} is a DoRA adapter; PEFT's add_weighted_adapter merges plain LoRA "
                                  f"adapters only (merge DoRA with our methods in full space)")
            if u.kind != "lora":
                raise UpdateError(f"{u.path} is a full update; PEFT's add_weighted_adapter merges LoRA adapters only "
                                  f"(use our methods in full space)")
        check_same_base(updates)
        self.updates, self.template, self.seed = list(updates), template, seed
        self.task_coefficients = list(task_coefficients) if task_coefficients is not None else [1.0] * len(updates)
        self.fallbacks: list[str] = []  # PEFT merges every adapted layer
        self._merged: dict[tuple, dict[str, torch.Tensor]] = {}

    def merge(self, method: str, isotropic: bool = False, **hparams) -> dict[str, torch.Tensor]:
        spec = get_merge_method(method)
        if not spec.peft_combination:
            raise ValueError(f"{method} is not a PEFT combination; merge it with task_merger.TaskMerger")
        if isotropic:
            raise ValueError("PEFT merges are not isotropized; drop --isotropize for peft_* methods")
        params = spec.with_defaults(hparams)
        key = tuple(sorted(params.items()))
        if key not in self._merged:
            model = peft_model(self.template, self.updates)
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                torch.manual_seed(self.seed)  # DARE's masks come from the global generator
                warnings.filterwarnings("ignore", message="The density .* no pruning")  # density 1 is in the grid
                model.add_weighted_adapter([f"task{i}" for i in range(len(self.updates))], self.task_coefficients,
                                           MERGED, combination_type=spec.peft_combination, **params)
            inner = model.base_model.model
            names = sorted(set().union(*(u.lora for u in self.updates)))
            with torch.no_grad():
                self._merged[key] = {name: inner.get_submodule(name.removesuffix(".weight"))
                                     .get_delta_weight(MERGED).detach().clone() for name in names}
        return self._merged[key]
