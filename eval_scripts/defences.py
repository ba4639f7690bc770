"""The post-hoc defences (PaRaMS, Merge-Lock) beside Trap² on the suite, from one command: each task's
unprotected update defended, its standalone accuracy, and the paper's post-merge grid with the defended target
merged with the other tasks' unprotected updates, against the all-unprotected control.

    python -m eval_scripts.defences --config configs/offline/vit_full.yaml   # PaRaMS and Merge-Lock
    python -m eval_scripts.defences --config configs/offline/vit_lora.yaml   # PaRaMS' adapter variant

Only the unprotected runs are trained here; the Trap² rows come from eval_scripts.reproduce's standalone table
and grid (the same methods and spaces) where they exist. Writes defences.{md,json} and defences.png next to the
standalone table; the cells land under merge/seed<N>/all-tasks-<defence>/, so tables.md lists them too.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from dataset.offline import PAPER_TASKS
from eval_scripts.evaluators import evaluator_for
from eval_scripts.grid import GridConfig, grid_cells, run_cells
from eval_scripts.linear_search import MergeConfig
from eval_scripts.reproduce import (CellResults, ReproduceConfig, all_task_claim, merge_root, read_summaries,
                                    results_folder, target_scenario)
from eval_scripts.tables import TablesConfig, build_tables
from models.defences import DEFENCES, Defence, DefenceOptions, defend_update
from models.options import option, parse_config
from models.runtime import default_jobs, pin_threads, resolve_device, run_cli
from models.updates import METADATA_FILE, load_update
from training_scripts.suite import default_results, prepare_bases, run_dir, suite_runs, suite_seeds, train_runs


REALIGN_METHODS = ["tv", "ties"]  # the realigning attacker's merges (full space)


@dataclass
class DefencesConfig(ReproduceConfig, DefenceOptions):
    defences: list[str] | None = option(
        None, "default: every defence that applies to the suite's updates (LoRA: those with an adapter variant)")
    realign_attack: bool = option(
        True, "also attack every defended target, and Trap²'s where its run is here, with an attacker who first "
              "realigns each update to the base (TA and TIES, full space)")
    claims_splits = ("test",)  # defences.md reports test


def chosen_defences(cfg: DefencesConfig) -> list[Defence]:
    names = cfg.defences or [d.name for d in DEFENCES.values() if cfg.peft == "full" or d.lora is not None]
    return [DEFENCES.lookup(name) for name in names]


def defended_dir(cfg: DefencesConfig, task: str, defence: str, seed: int) -> Path:
    """Beside the unprotected run it defends: <task>-<defence>[-seed<N>]."""
    plain = run_dir(cfg, task, False, seed)
    return plain.with_name(plain.name.replace("-plain", f"-{defence}", 1))


def defend_suite(cfg: DefencesConfig, tasks: list[str], defences: list[Defence]) -> None:
    """Trains the unprotected runs (finished ones are skipped) and defends each; a defended folder with its
    metadata is finished (the metadata is written after the weights)."""
    plain_runs = suite_runs(cfg, tasks, protected_tasks=[])
    prepare_bases(cfg, plain_runs)
    train_runs(plain_runs, cfg.jobs or default_jobs(cfg.device))
    options = DefenceOptions(cfg.strength, cfg.rank_per_head)
    for seed in suite_seeds(cfg):
        for defence in defences:
            for task in tasks:
                out = defended_dir(cfg, task, defence.name, seed)
                if not (out / METADATA_FILE).exists():
                    defend_update(run_dir(cfg, task, False, seed), defence.name, out, options, seed, cfg.base_options)


def standalone(cfg: DefencesConfig, tasks: list[str], defences: list[Defence]) -> dict:
    """Per seed: test accuracy (%) of zero-shot, the unprotected and each defended update on its own task,
    Trap²'s from command 1's standalone table where it has the seed, and each defence's largest relative
    output change."""
    device = resolve_device(cfg.device)
    table = Path(f"{cfg.results or default_results(cfg)}.json")  # command 1's standalone table, for Trap²
    trap2_table = json.loads(table.read_text())["rows_by_seed"] if table.exists() else {}
    out = {}
    for seed in suite_seeds(cfg):
        columns = {"fine-tuned": [run_dir(cfg, t, False, seed) for t in tasks],
                   **{d.title: [defended_dir(cfg, t, d.name, seed) for t in tasks] for d in defences}}
        updates = {name: [load_update(f) for f in folders] for name, folders in columns.items()}
        evaluator = evaluator_for([u for us in updates.values() for u in us], device,
                                  MergeConfig(target=cfg.target, device=cfg.device))
        evaluator.apply(None)
        row = {"zero-shot": {t: 100 * evaluator.accuracy(t, "test") for t in tasks}}
        for name, us in updates.items():
            row[name] = {}
            for u in us:
                evaluator.apply({n: u.delta(n) for n in u.names()}, 1.0)
                row[name][u.task] = 100 * evaluator.accuracy(u.task, "test")
        if str(seed) in trap2_table:
            row["Trap²"] = {r["task"]: 100 * r["trap2@1"] for r in trap2_table[str(seed)] if r["task"] in tasks}
        row["output change"] = {d.title: max(u.metadata["defence"]["relative_output_change"] for u in updates[d.title])
                                for d in defences}
        out[str(seed)] = row
    return out


def protection_groups(cfg: DefencesConfig, defences: list[Defence]) -> dict[str, str]:
    """Report column -> the merge group (folder under merge/seed<N>/) of its cells."""
    groups = {"Trap²": "all-tasks", **{d.title: f"all-tasks-{d.name}" for d in defences}}
    if cfg.realign_attack:
        groups.update({f"{title} realigned": f"{group}-realigned" for title, group in groups.items()})
    return groups


def defence_cells(cfg: DefencesConfig, tasks: list[str], defences: list[Defence], seeds: list[int]) -> list:
    """Per seed: the grid with each defended target, and the realigning attacker's cells (also for Trap²'s
    target where its run is here)."""
    cells = []
    for seed in seeds:
        others = [str(run_dir(cfg, t, False, seed)) for t in tasks if t != cfg.target]
        targets = {f"-{d.name}": defended_dir(cfg, cfg.target, d.name, seed) for d in defences}

        def grid(target: Path, group: str, **settings) -> list:
            return grid_cells(GridConfig(**{**target_scenario(cfg, seed), "protected": [str(target)]}, others=others,
                                         adaptive=cfg.adaptive, results_root=str(merge_root(cfg, seed, group)), **settings))
        for suffix, target in targets.items():
            cells += grid(target, f"all-tasks{suffix}", methods=cfg.merge_methods, spaces=cfg.merge_spaces)
        if cfg.realign_attack:
            trap2 = run_dir(cfg, cfg.target, True, seed)
            for suffix, target in {**targets, **({"": trap2} if (trap2 / METADATA_FILE).exists() else {})}.items():
                cells += grid(target, f"all-tasks{suffix}-realigned", methods=REALIGN_METHODS, spaces=["full"],
                              realign=True)
    return cells


def merge_claims(cfg: DefencesConfig, tasks: list[str], defences: list[Defence]) -> dict[str, dict[str, dict]]:
    """cell name -> protection (Trap², each defence, each realigned) -> the all-task bar's claim, where every
    seed of the cell is on disk (Trap²'s own cells are command 1's grid)."""
    seeds = suite_seeds(cfg)
    out: dict[str, dict[str, dict]] = {}
    for cell in grid_cells(GridConfig(target=cfg.target, methods=cfg.merge_methods, spaces=cfg.merge_spaces)):
        folder, name = f"{cell.merge_method}-{cell.merge_space}", f"{cell.merge_method}/{cell.merge_space}"
        for title, group in protection_groups(cfg, defences).items():
            if all((merge_root(cfg, seed, group) / folder / "summary.json").exists() for seed in seeds):
                out.setdefault(name, {})[title] = all_task_claim(cfg.target, CellResults(
                    group, name, len(tasks), read_summaries(cfg, group, folder)))
    return out


def _pm(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def _holds(claim: dict) -> str:
    """Whether the bar holds; a merger that leaves even the control at or below zero-shot proves nothing about
    the protection, and is marked so."""
    if claim["control"]["mean"] <= claim["zero_shot"]["mean"]:
        return "– (the merger wrecks the control too)"
    return "yes" if claim["holds"] else "NO"


def _verdict(claim: dict) -> str:
    """target / task mean / whether the bar holds."""
    return f"{_pm(claim['protected']['per_seed'])} / {_pm(claim['protected_task_mean']['per_seed'])} / {_holds(claim)}"


def _shared(by_title: dict[str, dict], titles: list[str]) -> dict:
    """A claim of a cell whose zero-shot and control every protection in `titles` shares (none realigned)."""
    return next(by_title[t] for t in titles if t in by_title)


def write_report(cfg: DefencesConfig, tasks: list[str], defences: list[Defence], alone: dict,
                 claims: dict[str, dict[str, dict]]) -> Path:
    folder = results_folder(cfg)
    seeds = suite_seeds(cfg)
    columns = [c for c in ("zero-shot", "fine-tuned", "Trap²", *(d.title for d in defences))
               if all(c in row for row in alone.values())]
    lines = [f"# Post-hoc defences beside Trap² ({cfg.model} {cfg.peft}; seeds {', '.join(map(str, seeds))})", "",
             f"Defences applied to the unprotected updates (strength {cfg.strength:g}"
             + (f", {cfg.rank_per_head} scaled dimensions per head" if cfg.peft == "lora" else "") + "; "
             "models.defences). Test accuracy (%), mean ± std over seeds.", "",
             f"## Standalone, mean over the {len(tasks)} tasks", "",
             "| " + " | ".join(columns) + " | largest relative output change |", "|---" * (len(columns) + 1) + "|",
             "| " + " | ".join(_pm([statistics.fmean(alone[str(s)][c].values()) for s in seeds]) for c in columns)
             + " | " + ", ".join(f"{d.title} {max(alone[str(s)]['output change'][d.title] for s in seeds):.1e}"
                                 for d in defences) + " |", "",
             f"## {cfg.target} after merging all {len(tasks)} tasks (the target protected, the others unprotected)", "",
             f"Bar (issue 14): protected {cfg.target} ≤ zero-shot + 1 and below the control, and the protected task "
             f"mean ≤ zero-shot mean + 0.5. Coefficient and method grid chosen on validation.", ""]
    present = [t for t in protection_groups(cfg, defences) if any(t in by_title for by_title in claims.values())]
    titles = [t for t in present if not t.endswith(" realigned")]  # these share the cell's control
    lines += ["| cell | zero-shot | control | " + " | ".join(f"{t} ({cfg.target} / task mean / holds)" for t in titles)
              + " |", "|---" * (3 + len(titles)) + "|"]
    for name, by_title in claims.items():
        shared = _shared(by_title, titles)
        cells = [_verdict(by_title[t]) if t in by_title else "–" for t in titles]
        lines.append(f"| {name} | {_pm(shared['zero_shot']['per_seed'])} "
                     f"(mean {_pm(shared['zero_shot_task_mean']['per_seed'])}) | "
                     f"{_pm(shared['control']['per_seed'])} | " + " | ".join(cells) + " |")
    realigned = [t for t in present if t.endswith(" realigned")]
    if realigned:
        lines += ["", "## The realigning attacker (`--realign true`: every update, the control's too, mapped to the "
                      "re-parameterisation nearest the base before merging)", "",
                  f"| cell | protection | {cfg.target}: protected / control (both realigned) | task mean / holds |",
                  "|---|---|---|---|"]
        for name, by_title in claims.items():
            for t in realigned:
                if t in by_title:
                    c = by_title[t]
                    lines.append(f"| {name} | {t.removesuffix(' realigned')} | {_pm(c['protected']['per_seed'])} / "
                                 f"{_pm(c['control']['per_seed'])} | {_pm(c['protected_task_mean']['per_seed'])} / "
                                 f"{_holds(c)} |")
    out = folder / "defences.md"
    out.write_text("\n".join(lines) + "\n")
    (folder / "defences.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "standalone": alone,
                                                      "merges": claims}, indent=2))
    plot_defences(cfg, claims, titles, folder / "defences.png")  # the protections that share a control
    return out


def plot_defences(cfg: DefencesConfig, claims: dict[str, dict[str, dict]], titles: list[str], path: Path) -> None:
    """The target after each all-task merge: every protection and the control, zero-shot as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(claims)
    kinds = titles + ["control"]
    width = 0.8 / len(kinds)
    drawn: list[float] = []
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 3.8))
    for i, kind in enumerate(kinds):
        if kind == "control":
            values = [_shared(claims[n], titles)["control"]["mean"] for n in names]
        else:
            values = [claims[n][kind]["protected"]["mean"] if kind in claims[n] else float("nan") for n in names]
        ax.bar([j + (i - (len(kinds) - 1) / 2) * width for j in range(len(names))], values, width, label=kind)
        drawn += [v for v in values if v == v]
    zero = [_shared(claims[n], titles)["zero_shot"]["mean"] for n in names]
    ax.plot(range(len(names)), zero, "_", ms=30, mew=2.5, color="k", label="zero-shot")
    ax.set_ylim(max(0.0, min(drawn + zero) - 8), max(drawn + zero) + 6)  # room above the bars for the legend
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set(ylabel=f"{cfg.target} test accuracy (%)", title=f"{cfg.target} after merging all tasks ({cfg.model} {cfg.peft})")
    ax.legend(fontsize=8, ncol=len(kinds) + 1, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_defences(cfg: DefencesConfig) -> Path:
    tasks = cfg.tasks or list(PAPER_TASKS)
    if cfg.target not in tasks:
        raise ValueError(f"--target {cfg.target} is not one of the suite's tasks {tasks}")
    defences = chosen_defences(cfg)
    pin_threads(resolve_device(cfg.device))
    if not cfg.report_only:
        defend_suite(cfg, tasks, defences)
        run_cells(defence_cells(cfg, tasks, defences, suite_seeds(cfg)), cfg.jobs or default_jobs(cfg.device))
    folder = results_folder(cfg)
    if cfg.report_only:  # the standalone numbers of the last full run, so that no run is needed
        previous = folder / "defences.json"
        if not previous.exists():
            raise FileNotFoundError(f"--report_only: {previous} is missing; run without --report_only to compute it")
        alone = json.loads(previous.read_text())["standalone"]
    else:
        alone = standalone(cfg, tasks, defences)
    build_tables(TablesConfig(results=str(folder), output=str(folder / "tables")))
    out = write_report(cfg, tasks, defences, alone, merge_claims(cfg, tasks, defences))
    print(out.read_text())
    return out


def main(argv=None) -> None:
    run_defences(parse_config(DefencesConfig, argv, __doc__.split("\n")[0]))


if __name__ == "__main__":
    run_cli(main)
