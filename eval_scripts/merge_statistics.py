"""Input statistics of data-dependent merges (RegMean, Chain of Merges): each linear layer's input Gram
matrix per task, from a few unlabelled training examples of that task.

- inputs (RegMean): task i's examples through the base with task i's own update;
- chain (Chain of Merges): layer by layer in forward order, task i's examples through the model whose
  earlier layers are already merged (at coefficient 1), so each layer sees the inputs the merged model
  will give it.
"""
from __future__ import annotations

from typing import Callable

import torch

from eval_scripts.evaluators import Evaluator
from models.updates import ReleasedUpdate
from task_merger import MergeMethod


def forward_order(evaluator: Evaluator, names: list[str], task: str) -> list[str]:
    """The linear layers among `names` in the order the net first runs them (on one example of `task`)."""
    modules = dict(evaluator.net.named_modules())
    order: list[str] = []
    hooks = [modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(
        lambda m, a, n=n: order.append(n) if n not in order else None)
        for n in names if n.endswith(".weight") and isinstance(modules.get(n.rsplit(".", 1)[0]), torch.nn.Linear)]
    try:
        with torch.no_grad():
            evaluator.feed(task, 1)
    finally:
        for h in hooks:
            h.remove()
    return order


def own_update_grams(evaluator: Evaluator, updates: list[ReleasedUpdate], names: list[str],
                     n_examples: int) -> dict[str, list[torch.Tensor]]:
    """RegMean's statistics: task i's inputs through W0 + ΔW_i."""
    per_task = []
    for u in updates:
        evaluator.apply({n: u.delta(n) for n in u.names()}, 1.0)
        per_task.append(evaluator.input_grams(names, u.task, n_examples))
    evaluator.apply(None)
    return {n: [g[n] for g in per_task] for n in per_task[0]}


def chain_grams(evaluator: Evaluator, updates: list[ReleasedUpdate], names: list[str], n_examples: int,
                merge_layer: Callable[[str, list[torch.Tensor]], torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Chain of Merges' statistics: for each layer in forward order, every task's inputs through the model
    whose earlier layers hold their merged update (`merge_layer(name, grams)`), then that layer is merged."""
    grams: dict[str, list[torch.Tensor]] = {}
    merged: dict[str, torch.Tensor] = {}
    for name in forward_order(evaluator, names, updates[0].task):
        evaluator.apply(merged, 1.0)
        grams[name] = [evaluator.input_grams([name], u.task, n_examples)[name] for u in updates]
        merged[name] = merge_layer(name, grams[name])
    evaluator.apply(None)
    return grams


class GramProvider:
    """`grams(params)` for TaskMerger: computed once per scenario (the chain once per hyperparameter set,
    since its earlier layers are merged with them)."""

    def __init__(self, evaluator: Evaluator, updates: list[ReleasedUpdate], method: MergeMethod, n_examples: int,
                 layer_inputs: Callable[[str], list[torch.Tensor]]):
        self.evaluator, self.updates, self.method, self.n = evaluator, updates, method, n_examples
        self.layer_inputs = layer_inputs  # name -> the (coefficient-scaled) ΔW_i the merge combines
        self.names = sorted(set().union(*(u.names() for u in updates)))
        self._cache: dict[tuple, dict[str, list[torch.Tensor]]] = {}

    def __call__(self, params: dict) -> dict[str, list[torch.Tensor]]:
        key = tuple(sorted(params.items())) if self.method.statistics == "chain" else ()
        if key not in self._cache:
            if self.method.statistics == "inputs":
                self._cache[key] = own_update_grams(self.evaluator, self.updates, self.names, self.n)
            else:
                self._cache[key] = chain_grams(
                    self.evaluator, self.updates, self.names, self.n,
                    lambda name, grams: self.method.fn(self.layer_inputs(name), grams=grams, **params))
        return self._cache[key]
