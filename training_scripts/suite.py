"""Train a whole suite, every task unprotected and Trap²-protected, and write the standalone table.

    python -m training_scripts.suite --config configs/offline/vit_lora.yaml

Each run is skipped when its update already exists (and resumes from its checkpoint if it was
interrupted), so the command can simply be re-run after a crash.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dataset.offline import PAPER_TASKS
from models.updates import METADATA_FILE
from training_scripts.config import TrainConfig, parse_config
from training_scripts.vision import REPORT_SCALES, train_vision


@dataclass
class SuiteConfig(TrainConfig):
    tasks: list[str] | None = None  # default: the eight paper tasks
    protect_lambda: float = 0.02  # λ of the protected runs (the unprotected ones use 0)
    runs_root: str = "runs"
    results: str | None = None  # default: results/<suite>/<model>/<peft>/standalone


def run_dir(cfg: SuiteConfig, task: str, protected: bool) -> Path:
    return Path(cfg.runs_root) / cfg.suite / cfg.model / cfg.peft / f"{task}-{'trap2' if protected else 'plain'}"


def train_suite(cfg: SuiteConfig) -> Path:
    tasks = cfg.tasks or list(PAPER_TASKS)
    base_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for task in tasks:
        for protected in (False, True):
            values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in base_fields}
            values.update(dataset=task, lambda_reg=cfg.protect_lambda if protected else 0.0,
                          output_dir=str(run_dir(cfg, task, protected)))
            train_vision(TrainConfig(**values))
    return write_standalone_table(cfg, tasks)


def write_standalone_table(cfg: SuiteConfig, tasks: list[str]) -> Path:
    rows = []
    for task in tasks:
        plain = json.loads((run_dir(cfg, task, False) / METADATA_FILE).read_text())
        trap2 = json.loads((run_dir(cfg, task, True) / METADATA_FILE).read_text())
        row = {"task": task, "zero_shot": plain["zero_shot_test_accuracy"]}
        for tag, meta in (("plain", plain), ("trap2", trap2)):
            for s in REPORT_SCALES[1:]:
                row[f"{tag}@{s:g}"] = meta["test_by_scale"][f"{s:g}"]["accuracy"]
        rows.append(row)
    mean = {"task": "mean", **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "task"}}
    rows.append(mean)
    out = Path(cfg.results or Path("results") / cfg.suite / cfg.model / cfg.peft / "standalone")
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    lines = [f"Standalone test accuracy (%) of {cfg.model} {cfg.peft} updates at scale s (W0 + s·ΔW); "
             f"Trap² λ = {cfg.protect_lambda}. s = 1 is the released update; s = 0 is the frozen base.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([r["task"]] + [f"{100 * r[c]:.1f}" for c in cols[1:]]) + " |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{out}.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows}, indent=2))
    print("\n".join(lines))
    return Path(f"{out}.md")


def main(argv=None) -> None:
    cfg = parse_config(SuiteConfig, argv, "Train every task of a suite, unprotected and Trap²-protected.")
    train_suite(cfg)


if __name__ == "__main__":
    main()
