"""The attacks beyond the paper's grid, on the suite from one command: PEFT's own adapter merging in
every combination type, RegMean and Chain of Merges (full space), each at the paper's size (the target
protected + every other task unprotected, against the all-unprotected control) and in two-task merges
(the target with each other task), then few-shot recovery of one all-task merge.

    python -m eval_scripts.attacks --config configs/offline/vit_lora.yaml [--seeds 420]

Cells land beside the main grid's (merge/seed<N>/<group>/<method>-full/), so results/tables.md lists
them; attacks.{md,json} give each cell's verdict against the paper's bars and the recovery curve.
`--claims_split val` judges the same cells on validation, for choosing a default against these attackers:
attacks-val.json only (no recovery, no table, no test number printed).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from dataset.offline import PAPER_TASKS
from eval_scripts.grid import GridConfig, grid_cells, run_cells
from eval_scripts.recovery import RecoveryConfig, RecoveryOptions, run_recovery
from eval_scripts.reproduce import (ReproduceConfig, CellResults, cell_results, merge_claims, merge_root, print_claims,
                                    results_folder, target_scenario, write_claims)
from eval_scripts.tables import TablesConfig, build_tables
from models.options import option, parse_config
from models.runtime import default_jobs, pin_threads, resolve_device, run_cli
from task_merger import MERGE_METHODS
from training_scripts.suite import run_dir, suite_seeds, train_suite_runs

ATTACK_METHODS = [name for name, m in MERGE_METHODS.items() if m.peft_combination or m.statistics]


@dataclass
class AttacksConfig(ReproduceConfig, RecoveryOptions):
    attack_methods: list[str] | None = option(
        None, "default: every PEFT combination type (peft_*), regmean, chain_of_merges")
    partners: list[str] | None = option(None, "two-task merges: the target with each of these (default: all others)")
    statistics_examples: int = option(128, "RegMean / Chain of Merges: unlabelled training examples per task")
    recovery_method: str = option("tv", "the all-task cell (method, full space) whose selected merges are fine-tuned")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_recovery()


def attack_cells(cfg: AttacksConfig, tasks: list[str]) -> list:
    others = [t for t in tasks if t != cfg.target]
    groups = {"all-tasks": others, **{f"with-{t}": [t] for t in (cfg.partners or others)}}
    cells = []
    for seed in suite_seeds(cfg):
        for group, members in groups.items():
            cells += grid_cells(GridConfig(**target_scenario(cfg, seed),
                                           others=[str(run_dir(cfg, t, False, seed)) for t in members],
                                           adaptive=cfg.adaptive and group == "all-tasks",
                                           statistics_examples=cfg.statistics_examples,
                                           methods=cfg.attack_methods or ATTACK_METHODS, spaces=["full"],
                                           results_root=str(merge_root(cfg, seed, group))))
    return cells


def attack_results(cfg: AttacksConfig, tasks: list[str]) -> list[CellResults]:
    return cell_results(cfg, attack_cells(dataclasses.replace(cfg, seeds=suite_seeds(cfg)[:1]), tasks), len(tasks))


def recovery_config(cfg: AttacksConfig, tasks: list[str]) -> RecoveryConfig:
    seed = suite_seeds(cfg)[0]
    others = [t for t in tasks if t != cfg.target]
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RecoveryOptions)}
    return RecoveryConfig(**target_scenario(cfg, seed), **options, others=[str(run_dir(cfg, t, False, seed))
                                                                          for t in others],
                          merge_method=cfg.recovery_method, merge_space="full", adaptive=cfg.adaptive,
                          output_dir=str(merge_root(cfg, seed, "all-tasks") / f"{cfg.recovery_method}-full"))


def write_report(cfg: AttacksConfig, claims: list[dict], recovery_csv: Path, folder: Path) -> Path:
    """attacks.md: per attack, the target and task mean after merging (protected, control, zero-shot) and
    whether the paper's bar holds; then the recovery table."""
    def pm(numbers: dict) -> str:
        return f"{numbers['mean']:.1f} ± {numbers['std']:.1f}" if len(numbers["per_seed"]) > 1 else f"{numbers['mean']:.1f}"

    seeds = suite_seeds(cfg)
    lines = [f"# Attacks beyond the paper's grid ({cfg.target} protected; seeds {', '.join(map(str, seeds))})", "",
             f"Test accuracy (%) of {cfg.target} after the attacker's merge, coefficient and method grid chosen on "
             f"validation. All-task bar: protected ≤ zero-shot + 1 and below the control, and the protected task mean "
             f"≤ zero-shot mean + 0.5. Two-task bar: protected ≤ zero-shot + 2 while the control keeps ≥ 30 % of its "
             f"gain.", "", "## All tasks merged", "",
             "| attack | zero-shot | protected | adaptive | control | protected task mean | zero-shot task mean | holds |",
             "|---|---|---|---|---|---|---|---|"]
    every = [c for c in claims if c["claim"].startswith("all-task merge")]
    for c in every:
        name = c["claim"].split(", ")[1].split(":")[0]
        adaptive = pm(c["protected_adaptive"]) if "protected_adaptive" in c else "–"
        # a merger that wrecks the unprotected control too proves nothing about the protection
        useless = c["control"]["mean"] <= c["zero_shot"]["mean"]
        verdict = "– (the merger wrecks the control too)" if useless else "yes" if c["holds"] else "NO"
        lines.append(f"| {name} | {pm(c['zero_shot'])} | {pm(c['protected'])} | {adaptive} | {pm(c['control'])} | "
                     f"{pm(c['protected_task_mean'])} | {pm(c['zero_shot_task_mean'])} | {verdict} |")
    pairs = [c for c in claims if c["claim"].startswith("two-task")]
    by_attack: dict[str, list[dict]] = {}
    for c in pairs:
        by_attack.setdefault(c["claim"].split(", ")[1].split(":")[0], []).append(c)
    lines += ["", "## Two-task merges (the target with each other task; mean over partners)", "",
              "| attack | zero-shot | protected | control | protected ≤ zero-shot + 2 | control keeps ≥ 30 % | holds |",
              "|---|---|---|---|---|---|---|"]
    for name, cs in by_attack.items():
        z, p, k = (statistics.fmean(c[key]["mean"] for c in cs) for key in ("zero_shot", "protected", "control"))
        low = sum(c["protected"]["mean"] <= c["zero_shot"]["mean"] + 2 for c in cs)
        kept = sum(c["control_gain_kept"] >= 0.3 for c in cs)
        lines.append(f"| {name} | {z:.1f} | {p:.1f} | {k:.1f} | {low}/{len(cs)} | {kept}/{len(cs)} | "
                     f"{sum(c['holds'] for c in cs)}/{len(cs)} |")
    rows = list(csv.DictReader(open(recovery_csv)))
    lines += ["", f"## Few-shot recovery ({cfg.recovery_method}/full all-task merge, seed {seeds[0]}, "
                  f"{cfg.recovery_steps} steps, a fresh LoRA adapter, seeds {cfg.recovery_seeds})", "",
              "| fine-tuned from | before | " + " | ".join(f"k = {k}" for k in cfg.shots) + " |",
              "|---|---|" + "---|" * len(cfg.shots)]
    for start in dict.fromkeys(r["start"] for r in rows):
        mine = {int(r["k"]): r for r in rows if r["start"] == start}
        lines.append(f"| {start} | {float(next(iter(mine.values()))['merged_test']):.1f} | " + " | ".join(
            f"{float(mine[k]['recovered_mean']):.1f} ± {float(mine[k]['recovered_std']):.1f}" for k in cfg.shots
            if k in mine) + " |")
    out = folder / "attacks.md"
    out.write_text("\n".join(lines) + "\n")
    (folder / "attacks.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "claims": claims,
                                                     "recovery": rows}, indent=2))
    return out


def attacks(cfg: AttacksConfig) -> Path:
    tasks = cfg.tasks or list(PAPER_TASKS)
    if cfg.target not in tasks:
        raise ValueError(f"--target {cfg.target} is not one of the suite's tasks {tasks}")
    pin_threads(resolve_device(cfg.device))
    cells = attack_cells(cfg, tasks)
    recovery = recovery_config(cfg, tasks)
    report = cfg.claims_split == "test"  # choosing on val: the cells' verdicts alone, no test number
    recovery_csv = Path(recovery.output_dir) / "recovery.csv"
    if cfg.report_only:  # --report_only (ReproduceConfig): the report from what is on disk
        missing = [c.output_dir for c in cells if not (Path(c.output_dir) / "summary.json").exists()]
        missing += [str(recovery_csv)] if report and not recovery_csv.exists() else []
        if missing:
            raise FileNotFoundError(f"--report_only: {missing[0]} is missing; run without --report_only to "
                                    f"compute it")
    else:
        # the runs its merges read: every plain update and the target's Trap² one (the standalone table is
        # command 1's, written with its settings)
        train_suite_runs(cfg, report, protected_tasks=[cfg.target])
        run_cells(sorted(cells, key=lambda cell: "all-tasks" not in cell.output_dir),
                  cfg.jobs or default_jobs(cfg.device))
        if report:
            run_recovery(recovery)
    folder = results_folder(cfg)
    claims = merge_claims(cfg, attack_results(cfg, tasks))
    if not report:
        out = write_claims(folder / "attacks-val.json", cfg, claims)
        print_claims(claims, "val", out, len(suite_seeds(cfg)))
        return out
    build_tables(TablesConfig(results=str(folder), output=str(folder / "tables")))
    out = write_report(cfg, claims, recovery_csv, folder)
    print(out.read_text())
    return out


def main(argv=None) -> None:
    attacks(parse_config(AttacksConfig, argv, __doc__.split("\n")[0]))


if __name__ == "__main__":
    run_cli(main)
