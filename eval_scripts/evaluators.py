"""Merge evaluators: put a merged update on the base and score every task of the merge on a split.

One interface (Evaluator), a vision and a math implementation, chosen by the updates' suite (EVALUATORS);
eval_scripts.linear_search runs the protocol over whichever it gets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from dataset.math import load_math_task
from models.backbones import BACKBONES, Base, load_base
from models.causal_lm import LM_RECIPES, QUANTIZATIONS, accuracy, load_causal_lm, offline_lm_is_built
from models.classifier import ZeroShotClassifier
from models.layer_inputs import layer_input_grams
from models.updates import ReleasedUpdate, UpdateError, base_request, refuse_unbuilt_base
from models.pretrain import RECIPES, offline_base_is_built
from models.vision import DataSettings, evaluate, load_task, task_head
from task_merger import apply_merged

LOCAL_DATA_FIELDS = {"data_root", "num_workers", "download"}  # where this machine keeps the data, not which data


class Evaluator:
    """What the merge protocol uses: `tasks` (by name), `data_key` (what a logged point depends on besides
    the weights), `apply(merged, c)` (W = W0 + c·M, every other weight back at W0) and `all_tasks(split)`."""

    net: torch.nn.Module
    base_state: dict[str, torch.Tensor]  # W0 of (at least) every parameter a merge changes
    tasks: dict
    data_key: dict

    def accuracy(self, task: str, split: str) -> float:
        raise NotImplementedError

    def apply(self, merged: dict[str, torch.Tensor] | None, coefficient: float = 0.0) -> None:
        check_finite(merged)
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, value in self.base_state.items():
                if name in params:  # buffers never change
                    params[name].copy_(value)
        if merged:
            apply_merged(self.net, self.base_state, merged, coefficient)

    def all_tasks(self, split: str) -> dict[str, float]:
        return {name: self.accuracy(name, split) for name in self.tasks}

    def feed(self, task: str, n_examples: int) -> None:
        """Runs the net on the first n training inputs of a task, labels unused (data-dependent merging)."""
        raise NotImplementedError(f"{type(self).__name__} has no unlabelled inputs for data-dependent merging "
                                  f"(RegMean, Chain of Merges); use a vision suite")

    def input_grams(self, names: list[str], task: str, n_examples: int) -> dict[str, torch.Tensor]:
        """XᵀX / rows (float64) of the inputs X of every linear layer whose weight is in `names`, over the
        first n training examples of `task` (every token a row), with the weights as they are now."""
        return layer_input_grams(self.net, names, lambda: self.feed(task, n_examples))


@dataclass
class TaskEval:
    name: str
    classifier: ZeroShotClassifier
    task: object
    finetuned: dict[str, float] = field(default_factory=dict)  # split -> standalone accuracy


class VisionEvaluator(Evaluator):
    """Image classification accuracy of the merged vision base, per task (zero-shot heads)."""

    def __init__(self, updates: list[ReleasedUpdate], device: torch.device, eval_batch_size: int = 512,
                 val_limit: int | None = None, data_root: str | None = None, num_workers: int | None = None,
                 base_options: dict | None = None):
        name, options = base_request(updates, base_options, BACKBONES)
        self.device, self.batch, self.val_limit = device, eval_batch_size, val_limit
        if base_options is None and name in RECIPES:
            refuse_unbuilt_base(updates, name, options, offline_base_is_built)
        self.base: Base = load_base(name, options, device)
        self.net = self.base.backbone.net
        self.base_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        for u in updates:
            u.check_base(self.base.fingerprint, self.base_state)
        self.data = shared_data_settings(updates)
        # what a logged point depends on besides the weights: the data every task is scored on
        self.data_key = {k: v for k, v in dataclasses.asdict(self.data).items() if k not in LOCAL_DATA_FIELDS}
        self.tasks: dict[str, TaskEval] = {}
        for u in updates:
            name = u.task
            if name in self.tasks:
                continue
            data = dataclasses.replace(self.data, **{k: v for k, v in (("data_root", data_root),
                                                                         ("num_workers", num_workers)) if v is not None})
            task = load_task(self.base, name, data)
            head = task_head(self.base, task, data)
            self.tasks[name] = TaskEval(name, ZeroShotClassifier(self.base.backbone, head.to(device)), task)

    def feed(self, task: str, n_examples: int) -> None:
        entry = self.tasks[task]
        for x, _ in entry.task.batches("train", self.batch, n_examples):
            entry.classifier(x.to(self.device))

    def accuracy(self, task: str, split: str) -> float:
        limit = self.val_limit if split == "val" else None
        return evaluate(self.tasks[task].classifier, self.tasks[task].task, split, self.batch, self.device,
                        limit)["accuracy"]


def shared_data_settings(updates: list[ReleasedUpdate]) -> DataSettings:
    """The data every update of a merge was trained and evaluated on; they must agree, so that no one
    update's metadata (a released one, say) picks the splits, sizes or heads everybody is scored on."""
    first = None
    for u in updates:
        if not isinstance(u.metadata.get("config"), dict):
            raise UpdateError(f"{u.path}: its metadata holds no training config; save the update with training_scripts")
        settings = DataSettings.from_config(u.metadata["config"], suite=u.metadata.get("suite"))
        recorded = {k: v for k, v in dataclasses.asdict(settings).items() if k not in LOCAL_DATA_FIELDS}
        if first is None:
            first, first_settings = (u, recorded), settings
        elif recorded != first[1]:
            diff = {k: (first[1][k], recorded[k]) for k in recorded if recorded[k] != first[1][k]}
            raise UpdateError(f"{u.path}: its recorded data settings differ from {first[0].path}'s ({diff}); "
                              f"updates of one merge must be trained on the same data")
    return first_settings


def check_finite(merged: dict[str, torch.Tensor] | None) -> None:
    """A merge with NaN/Inf would score like a protection that works; stop instead of reporting it."""
    for name, t in (merged or {}).items():
        if not torch.isfinite(t).all():
            raise UpdateError(f"the merged update of {name} holds NaN or Inf; one of the updates is corrupt "
                              f"(the merge itself stays finite on finite inputs)")


class MathEvaluator(Evaluator):
    """Greedy-generation exact-match accuracy of the merged causal LM, per task."""

    def __init__(self, updates: list[ReleasedUpdate], device: torch.device, eval_batch_size: int = 16,
                 val_limit: int | None = None, data_root: str | None = None, progress: bool = False,
                 base_options: dict | None = None):
        self.device, self.batch, self.val_limit, self.progress = device, eval_batch_size, val_limit, progress
        name, options = base_request(updates, base_options)
        if base_options is None and name in LM_RECIPES:
            refuse_unbuilt_base(updates, name, options, offline_lm_is_built)
        quantizations = {u.metadata.get("quantization", "none") for u in updates}
        if len(quantizations) > 1 or not quantizations <= set(QUANTIZATIONS):
            raise UpdateError(f"the updates were trained on bases quantized as {sorted(map(str, quantizations))}; "
                              f"merge updates of one base, quantized one way ({', '.join(QUANTIZATIONS)})")
        quantization = quantizations.pop()
        self.lm = load_causal_lm(name, options, torch.bfloat16 if device.type == "cuda" else None, quantization,
                                 device)
        self.net = self.lm.model if getattr(self.lm.model, "is_loaded_in_4bit", False) else self.lm.model.to(device)
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
        # what a logged point depends on besides the weights (see VisionEvaluator.data_key)
        self.data_key = {u.task: {"data_seed": u.metadata["config"]["data_seed"], "max_new_tokens":
                                  self.max_new_tokens[u.task], "split_sizes": u.metadata["config"].get("split_sizes")}
                         for u in updates}

    def accuracy(self, task: str, split: str) -> float:
        examples = self.tasks[task].splits[split]
        if split == "val" and self.val_limit:
            examples = examples[:self.val_limit]
        return accuracy(self.net, self.lm.tokenizer, examples, self.batch, self.max_new_tokens[task], self.device,
                        self.progress)


def _vision(updates: list[ReleasedUpdate], device: torch.device, cfg) -> Evaluator:
    return VisionEvaluator(updates, device, cfg.eval_batch_size, cfg.val_limit, cfg.data_root, cfg.num_workers,
                           cfg.base_options)


def _math(updates: list[ReleasedUpdate], device: torch.device, cfg) -> Evaluator:
    return MathEvaluator(updates, device, cfg.eval_batch_size, cfg.val_limit, cfg.data_root,
                         base_options=cfg.base_options)


EVALUATORS = {"offline": _vision, "vision8": _vision, "math": _math}  # by the updates' suite


def evaluator_for(updates: list[ReleasedUpdate], device: torch.device, cfg) -> Evaluator:
    """The evaluator of the updates' suite (they must share one), built from a merge config's settings."""
    suites = {u.metadata.get("suite") for u in updates}
    if len(suites) != 1 or next(iter(suites)) not in EVALUATORS:
        raise UpdateError(f"the updates' suites are {sorted(map(str, suites))}; merge updates of one suite, one of "
                          f"{sorted(EVALUATORS)}")
    return EVALUATORS[suites.pop()](updates, device, cfg)
