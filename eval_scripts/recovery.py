"""Few-shot recovery: how many labelled target examples undo what merging did to the target?

    python -m eval_scripts.recovery --config configs/merge/offline_vit_lora_gtsrb.yaml [--shots 8 32 128 512]

The merge config's cell is evaluated first (its logged points make that free when it has run), then, for the
selected merge of each scenario (protected, control) and for the zero-shot base, an attacker holding k
labelled target training examples fine-tunes a fresh LoRA adapter on the merged model (λ = 0, the target
update's rank, targets and learning rate) for a fixed number of steps, and the target's test accuracy is
recorded. Results (one JSON line each, so an interrupted study resumes): <cell>/recovery.jsonl, and
recovery.csv and recovery.png (accuracy against k, mean ± std over the seeds).
"""
from __future__ import annotations

import copy
import csv
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from eval_scripts.linear_search import MergeConfig, make_merger, run_merge_eval, setup_merge
from models.options import option, parse_config
from models.runtime import run_cli
from models.storage import append_jsonl, read_jsonl
from models.vision import evaluate
from training_scripts.config import TrainConfig
from training_scripts.loop import run_loop
from training_scripts.runs import build_objective, epoch_order, loop_settings, seed_everything
from training_scripts.vision import attach_update

STARTS = ("protected", "control", "zero-shot")  # what the attacker fine-tunes: each scenario's merge, or the base


@dataclass
class RecoveryOptions:
    shots: list[int] = option(help="labelled target training examples the attacker holds (k)",
                              factory=lambda: [8, 32, 128, 512])
    recovery_seeds: list[int] = option(
        help="seeds of the drawn examples and the adapter's initialisation", factory=lambda: [0, 1, 2])
    recovery_steps: int = option(100, "optimiser steps of each recovery fine-tune")
    recovery_lr: float | None = option(None, "default: the target update's training learning rate")
    recovery_batch_size: int = option(32, "examples per step (at most k)")

    def check_recovery(self) -> None:
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"--shots must be positive example counts, got {self.shots}")
        for name in ("recovery_steps", "recovery_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RecoveryConfig(MergeConfig, RecoveryOptions):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_recovery()


def recovery_train_config(update, cfg: RecoveryConfig, k: int, seed: int, out_dir: Path) -> TrainConfig:
    """λ = 0 and the target update's adapter shape and learning rate (a whitelist of its recorded config)."""
    recorded = update.metadata["config"]
    steps = cfg.recovery_steps
    return TrainConfig(dataset=update.task, model=update.metadata["base_model"], peft="lora", lambda_reg=0.0,
                       lora_rank=recorded.get("lora_rank", 16), lora_alpha=recorded.get("lora_alpha", 16.0),
                       lora_targets=recorded.get("lora_targets"), lr=cfg.recovery_lr or recorded.get("lr"),
                       batch_size=min(cfg.recovery_batch_size, k), max_steps=steps, warmup_steps=max(1, steps // 10),
                       eval_freq=steps, seed=seed, device=cfg.device, progress=False, output_dir=str(out_dir))


def fine_tune(classifier: torch.nn.Module, task, update, cfg: RecoveryConfig, k: int, seed: int,
              device: torch.device) -> float:
    """The target's test accuracy after fine-tuning a fresh adapter on k drawn training examples."""
    images, labels = map(torch.cat, zip(*task.batches("train", 1024)))
    picks = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:k]
    x_k, y_k = images[picks], labels[picks]
    with tempfile.TemporaryDirectory() as tmp:
        train_cfg = recovery_train_config(update, cfg, k, seed, Path(tmp))
        model = copy.deepcopy(classifier)
        seed_everything(seed)
        adapter = attach_update(model, train_cfg)
        model.to(device)
        batch, per_epoch = train_cfg.batch_size, max(1, k // train_cfg.batch_size)

        def batch_at(step: int):
            epoch, i = divmod(step, per_epoch)
            rows = epoch_order(k, seed, epoch)[i * batch:(i + 1) * batch]
            return x_k[rows].to(device), y_k[rows].to(device)

        def loss_fn(forward, b):
            return F.cross_entropy(forward(b[0]).float(), b[1], reduction="none")

        # no validation set: the attacker holds k examples and keeps the last step
        run_loop(model, adapter, build_objective(train_cfg), loss_fn, batch_at, lambda: 0.0,
                 loop_settings(train_cfg, device), Path(tmp), device)
    return evaluate(model, task, "test", cfg.eval_batch_size, device)["accuracy"]


def run_recovery(cfg: RecoveryConfig) -> Path:
    out = run_merge_eval(cfg)  # the selected merges (free when the cell has run)
    summary = json.loads((out / "summary.json").read_text())
    setup = setup_merge(cfg)
    evaluator = setup.evaluator
    target = evaluator.tasks[cfg.target]
    log_path = out / "recovery.jsonl"
    done = {r["key"]: r for r in read_jsonl(log_path)}
    starts = [s for s in STARTS if s == "zero-shot" or setup.scenarios[s]]
    studied = []  # this study's keys: the log may also hold other settings' and superseded updates' records
    for start in starts:
        updates, selected = [], {}
        if start == "zero-shot":
            evaluator.apply(None)
        else:
            selected = summary["scenarios"][start]
            updates = setup.scenarios[start] + setup.others[start]
            evaluator.apply(make_merger(evaluator, updates, cfg).merge(cfg.merge_method, isotropic=cfg.isotropize,
                                                                      **selected["params"]), selected["c"])
        first_update = (setup.scenarios["control"] or setup.scenarios["protected"])[0]
        merged_accuracy = evaluate(target.classifier, target.task, "test", cfg.eval_batch_size,
                                   evaluator.device)["accuracy"]
        for k in cfg.shots:
            for seed in cfg.recovery_seeds:
                # the merged updates' and the adapter template's weights, so a retrained update is not a logged one
                key = json.dumps({"start": start, "k": k, "seed": seed, "steps": cfg.recovery_steps,
                                  "lr": cfg.recovery_lr, "batch": cfg.recovery_batch_size, "merge": selected.get("c"),
                                  "params": selected.get("params"), "updates": [u.content_hash for u in updates],
                                  "adapter_like": first_update.content_hash}, sort_keys=True)
                studied.append(key)
                if key in done:
                    continue
                acc = fine_tune(target.classifier, target.task, first_update, cfg, k, seed, evaluator.device)
                done[key] = {"key": key, "start": start, "k": k, "seed": seed, "merged_test": merged_accuracy,
                             "recovered_test": acc}
                append_jsonl(log_path, done[key])
                print(f"recovery {start} k={k} seed={seed}: {100 * merged_accuracy:.1f} -> {100 * acc:.1f} %")
    evaluator.apply(None)
    rows = write_recovery(out, [done[key] for key in studied], cfg)
    return out / "recovery.csv" if rows else out


def write_recovery(out: Path, records: list[dict], cfg: RecoveryConfig) -> list[dict]:
    """recovery.csv (mean ± std per start and k) and recovery.png."""
    rows = []
    for start in STARTS:
        for k in sorted({r["k"] for r in records}):
            accs = [100 * r["recovered_test"] for r in records if r["start"] == start and r["k"] == k]
            if accs:
                before = next(100 * r["merged_test"] for r in records if r["start"] == start)
                rows.append({"start": start, "k": k, "merged_test": round(before, 2),
                             "recovered_mean": round(statistics.fmean(accs), 2),
                             "recovered_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
                             "seeds": len(accs)})
    with open(out / "recovery.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for start, colour in zip(STARTS, ("tab:red", "tab:blue", "0.4")):
        mine = [r for r in rows if r["start"] == start]
        if mine:
            ks = [0] + [r["k"] for r in mine]
            ax.errorbar(range(len(ks)), [mine[0]["merged_test"]] + [r["recovered_mean"] for r in mine],
                        yerr=[0] + [r["recovered_std"] for r in mine], fmt="o-", color=colour, capsize=3,
                        label=f"{start}{' base' if start == 'zero-shot' else ' merge'}")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set(xlabel="labelled target examples the attacker fine-tunes on (k)",
           ylabel=f"{cfg.target} test accuracy (%)",
           title=f"recovery after {cfg.merge_method}/{cfg.merge_space} ({cfg.recovery_steps} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recovery.png", dpi=110)
    plt.close(fig)
    return rows


def main(argv=None) -> None:
    print(run_recovery(parse_config(RecoveryConfig, argv, __doc__.split("\n")[0])))


if __name__ == "__main__":
    run_cli(main)
