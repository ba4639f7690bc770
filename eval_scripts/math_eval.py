"""Merge evaluation for the math path: the merged causal LM's greedy-generation accuracy per task.

The same protocol as the vision tasks (eval_scripts.linear_search picks this evaluator for updates
whose suite is "math"): pre-merge pass, coefficient search on validation, test report.
"""
from __future__ import annotations

import torch

from dataset.math import load_math_task
from models.causal_lm import LM_RECIPES, load_causal_lm, offline_lm_is_built
from models.updates import ReleasedUpdate, UpdateError, base_request
from task_merger import apply_merged
from training_scripts.math import accuracy


class MathMergeEvaluator:
    def __init__(self, updates: list[ReleasedUpdate], device: torch.device, eval_batch_size: int = 16,
                 val_limit: int | None = None, data_root: str | None = None, progress: bool = False,
                 base_options: dict | None = None):
        meta = updates[0].metadata
        for u in updates:
            if u.metadata.get("base_model") != meta.get("base_model") or u.metadata.get("suite") != "math":
                raise UpdateError(f"{u.path}: base {u.metadata.get('base_model')!r} (suite "
                                  f"{u.metadata.get('suite')!r}) differs from {meta.get('base_model')!r} (math)")
        self.device, self.batch, self.val_limit, self.progress = device, eval_batch_size, val_limit, progress
        name, options = base_request(updates, base_options)
        if base_options is None and name in LM_RECIPES and not offline_lm_is_built(name, **options):
            raise UpdateError(f"{updates[0].path}: base {name} with options {options} is not built on this machine, "
                              f"and an update may not start pretraining; build it first (the math trainer that "
                              f"trained the update) or pass --base_options")
        self.lm = load_causal_lm(name, options, torch.bfloat16 if device.type == "cuda" else None)
        self.net = self.lm.model.to(device)
        state = self.net.state_dict()
        for u in updates:
            u.check_base(self.lm.fingerprint, state)
        touched = sorted({name for u in updates for name in u.names()})
        self.base_state = {name: state[name].detach().clone() for name in touched}  # only what merges change
        self.tasks, self.max_new_tokens = {}, {}
        for u in updates:
            cfg = u.metadata["config"]
            if u.task not in self.tasks:
                self.tasks[u.task] = load_math_task(u.task, data_root or cfg.get("data_root"), cfg["data_seed"],
                                                    cfg.get("split_sizes"))
                self.max_new_tokens[u.task] = cfg["max_new_tokens"]
        # what a logged point depends on besides the weights (see MergeEvaluator.data_key)
        self.data_key = {u.task: {"data_seed": u.metadata["config"]["data_seed"], "max_new_tokens":
                                  self.max_new_tokens[u.task], "split_sizes": u.metadata["config"].get("split_sizes")}
                         for u in updates}

    def apply(self, merged: dict[str, torch.Tensor] | None, coefficient: float = 0.0) -> None:
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, value in self.base_state.items():
                params[name].copy_(value)
        if merged:
            apply_merged(self.net, self.base_state, merged, coefficient)

    def accuracy(self, task: str, split: str) -> float:
        examples = self.tasks[task].splits[split]
        if split == "val" and self.val_limit:
            examples = examples[:self.val_limit]
        return accuracy(self.net, self.lm.tokenizer, examples, self.batch, self.max_new_tokens[task], self.device,
                        self.progress)

    def all_tasks(self, split: str) -> dict[str, float]:
        return {name: self.accuracy(name, split) for name in self.tasks}
