"""The offline reproduction from one command: updates, the standalone table, the post-merge grid,
the merge-size study, the tables and figures, and a verdict on each claim.

    python -m eval_scripts.reproduce --config configs/offline/vit_lora.yaml [--seeds 420 421 422]

Stages, each resumable (finished runs and evaluated merge points are reused on a rerun):
1. the suite: every task unprotected and Trap²-protected; results/<suite>/<model>/<peft>/standalone;
2. the paper's post-merge grid: the target protected + the other tasks unprotected, against the
   all-unprotected control, 5 methods × 3 spaces, with the adaptive attacker; merge/seed<N>/all-tasks/;
3. the merge-size study: the target with each other task alone, and with the first three others
   (Task Arithmetic and TIES, full and Core space); merge/seed<N>/with-<task>/ and 4-tasks/;
4. the scaling curves of the target's updates (accuracy and loss against s, first seed);
5. tables.md/.tex, figures (post-merge cells; accuracy against merge size) and claims.json (each
   claim, its numbers, true or false) next to the standalone table.

Choosing a default's hyperparameters reads validation only: `--claims_split val` judges the same claims on
validation accuracies (each update's at s = 1, each merge's at the attacker's chosen point) into
claims-val.json, and prints no test number.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from dataset.offline import PAPER_TASKS
from eval_scripts.grid import MERGE_SPACES, GridConfig, grid_cells, run_cells, usable_spaces
from eval_scripts.scaling_curve import CurveConfig, run_curve
from eval_scripts.tables import TablesConfig, build_tables
from models.options import option, parse_config
from models.runtime import default_jobs, pin_threads, provenance, resolve_device, run_cli
from models.updates import load_update
from training_scripts.suite import (SuiteConfig, default_results, print_training_commands, read_standalone_table,
                                   run_dir, runs_finished, runs_provenance, suite_seeds, train_suite,
                                   validation_accuracy, write_standalone_table)

# The claims, as issue 14 states them (points of accuracy; the report reads test, a selection val).
MAX_COST = 1.5  # standalone: fine-tuned − Trap², mean over tasks
MAX_TARGET_ABOVE_ZERO_SHOT = 1.0  # all-task merge: protected target at most this far above zero-shot
MAX_MEAN_ABOVE_ZERO_SHOT = 0.5  # all-task merge: the protected scenario's task mean
MAX_PAIR_TARGET_ABOVE_ZERO_SHOT = 2.0  # two-task merges
MIN_CONTROL_GAIN_KEPT = 0.3  # two-task merges: the control keeps this share of its gain over zero-shot
# accuracies are counts over at most millions of images, so gaps under 1e-9 are float rounding (0.412 · 100 + 2 < 43.2)
ROUNDING = 1e-9


def _condition(per_seed_margins: list[float], margin: float | None = None, strict: bool = False) -> dict:
    """One condition of a claim, from how far each seed lands on its holding side of the bar (the condition's own
    units; negative: it misses). `margin`: the one the verdict reads (default: the seeds' mean); `se`: the standard
    error of the seeds' mean (0 for one seed), so a verdict within about one `se` of its bar could turn on other
    seeds. It holds at margin ≥ 0 (strict: > 0), a tie that float arithmetic broke still a tie."""
    margin = statistics.fmean(per_seed_margins) if margin is None else margin
    se = statistics.stdev(per_seed_margins) / len(per_seed_margins) ** 0.5 if len(per_seed_margins) > 1 else 0.0
    return {"met": margin > ROUNDING if strict else margin >= -ROUNDING, "margin": margin, "se": se}


@dataclass
class ReproduceConfig(SuiteConfig):
    target: str = option("gtsrb", "the protected task of the merge scenarios")
    val_limit: int | None = option(
        None, "the coefficient search reads the first N validation images per task (none: all, the paper's protocol)")
    adaptive: bool = option(True, "also search a separate coefficient for the target (all-task grid)")
    merge_methods: list[str] | None = option(None, "methods of the all-task grid; default: the paper's five")
    merge_spaces: list[str] | None = option(None, "spaces of the all-task grid; default: full, knots, core")
    size_methods: list[str] | None = option(None, "methods of the merge-size study; default: tv, ties")
    size_spaces: list[str] | None = option(None, "spaces of the merge-size study; default: full, core")
    merge_sizes: bool = option(
        True, "run the merge-size study (the target with each other task, and with three others)")
    report_only: bool = option(
        False, "only rebuild the tables, figures and claims from the finished runs and merges on disk (e.g. seeds "
               "merged on other machines); train and merge nothing. Without the runs, the standalone table is read "
               "as it is")
    claims_split: str = option(
        "test", "split the claims read: test (the report) or val (for choosing hyperparameters: claims-val.json, "
                "and no test number printed)")

    claims_splits = ("test", "val")  # what this command can judge on; commands built on it may allow fewer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.claims_split not in self.claims_splits:
            raise ValueError(f"--claims_split must be {' or '.join(self.claims_splits)} for this command, got "
                             f"{self.claims_split!r} (settings are chosen on val by eval_scripts.reproduce)")


def results_folder(cfg: ReproduceConfig) -> Path:
    return Path(cfg.results or default_results(cfg)).parent


def merge_root(cfg: ReproduceConfig, seed: int, group: str) -> Path:
    return results_folder(cfg) / "merge" / f"seed{seed}" / group


def target_scenario(cfg: ReproduceConfig, seed: int) -> dict:
    """The merge settings every cell of a seed shares: the target's protected and unprotected updates."""
    return dict(target=cfg.target, protected=[str(run_dir(cfg, cfg.target, True, seed))],
                control=[str(run_dir(cfg, cfg.target, False, seed))], val_limit=cfg.val_limit, device=cfg.device)


def merge_cells(cfg: ReproduceConfig, tasks: list[str]) -> list:
    if cfg.target not in tasks:
        raise ValueError(f"--target {cfg.target} is not one of the suite's tasks {tasks}")
    others = [t for t in tasks if t != cfg.target]
    # from the config, not the updates' files, so that --report_only needs no runs on disk
    spaces = usable_spaces(cfg.merge_spaces or list(MERGE_SPACES), {cfg.peft})
    size_spaces = usable_spaces(cfg.size_spaces or ["full", "core"], {cfg.peft}) if cfg.merge_sizes else []
    if not spaces:
        raise ValueError(f"--merge_spaces {' '.join(cfg.merge_spaces)}: Core space needs LoRA factors and --peft "
                         f"full updates have none; add full or knots")
    groups = {f"with-{other}": [other] for other in others} if size_spaces else {}
    if groups and len(others) > 3:
        groups["4-tasks"] = others[:3]
    cells = []
    for seed in suite_seeds(cfg):
        scenario = target_scenario(cfg, seed)
        cells += grid_cells(GridConfig(**scenario, others=[str(run_dir(cfg, t, False, seed)) for t in others],
                                       adaptive=cfg.adaptive, methods=cfg.merge_methods, spaces=spaces,
                                       results_root=str(merge_root(cfg, seed, "all-tasks"))))
        for group, members in groups.items():
            cells += grid_cells(GridConfig(**scenario, others=[str(run_dir(cfg, t, False, seed)) for t in members],
                                           methods=cfg.size_methods or ["tv", "ties"], spaces=size_spaces,
                                           results_root=str(merge_root(cfg, seed, group))))
    return cells


def merge_size(group: str, n_tasks: int) -> int:
    return n_tasks if group == "all-tasks" else 4 if group == "4-tasks" else 2


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def _claim(text: str, conditions: dict[str, dict], **numbers) -> dict:
    """A claim holds when all its conditions (`_condition`) do; `unmet` names those that do not, with their numbers;
    `margins` gives each condition's distance to its bar and that distance's standard error over the seeds."""
    return {"claim": text, "holds": all(c["met"] for c in conditions.values()),
            "unmet": [text for text, c in conditions.items() if not c["met"]],
            "margins": {text: {"margin": c["margin"], "se": c["se"]} for text, c in conditions.items()}, **numbers}


@dataclass
class CellResults:
    """One merge cell (group × method × space): its summary.json for every seed."""

    group: str
    name: str  # method/space
    size: int  # tasks merged
    per_seed: list[dict]

    def target(self, kind: str, target: str, split: str = "test") -> list[float]:
        """The target's accuracy (%) per seed on a split: `zero-shot`, `protected` or `control`."""
        return [100 * a[target] for a in self.accuracies(kind, split)]

    def accuracies(self, kind: str, split: str = "test") -> list[dict[str, float]]:
        """Every merged task's accuracy (fraction) per seed on a split: `zero-shot`, `protected` or `control`
        (val: at the point the attacker chose)."""
        if kind == "zero-shot":
            return [s["pre_merge"]["zero_shot"][split] for s in self.per_seed]
        missing = [s["config"]["output_dir"] for s in self.per_seed if split not in s["scenarios"][kind]]
        if missing:
            raise ValueError(f"{missing[0]}/summary.json has no {split} accuracies of its chosen merge (written by "
                             f"older code); run the command without --report_only: its points are cached, so "
                             f"nothing is merged again")
        return [s["scenarios"][kind][split] for s in self.per_seed]

    def finetuned(self, target: str, split: str = "test") -> list[float]:
        """The unprotected target update alone (%), per seed."""
        return [100 * s["pre_merge"]["alone"][split][str(Path(s["config"]["control"][0]))][target]
                for s in self.per_seed]


def _images(val_limit: int | None) -> str:
    return "every validation image" if val_limit is None else f"the first {val_limit} validation images"


_ON_DISK: dict[tuple, tuple[str | None, str]] = {}  # an update folder's files' stamps -> (its base, content hash)


def _update_on_disk(folder: Path) -> tuple[str | None, str]:
    """The base fingerprint and content hash of the update a folder holds now (read once per version of its files)."""
    stamp = (str(folder.resolve()), *sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in folder.iterdir()))
    if stamp not in _ON_DISK:
        update = load_update(folder)
        _ON_DISK[stamp] = update.metadata.get("base_fingerprint"), update.content_hash
    return _ON_DISK[stamp]


def check_merged_updates(path: Path, summary: dict) -> None:
    """Refuses a merge summary whose update folders now hold other updates (another base, or trained again), so
    that a report never pairs the runs on disk with merges of earlier ones. Folders not on disk (a clone holding
    results/ only) are not checked; summaries written before update hashes were recorded are checked by base."""
    settings = summary["config"]
    listed = [folder for key in ("protected", "control", "others", "protected_others")
              for folder in settings.get(key) or ()]
    hashes = summary.get("update_hashes") or dict.fromkeys(listed)
    merged_base = summary["provenance"]["base_fingerprint"]
    for folder, merged_hash in hashes.items():
        if not Path(folder).is_dir():
            continue
        base, content_hash = _update_on_disk(Path(folder))
        if base != merged_base:
            raise ValueError(f"{path} merged updates trained on base {merged_base}, but {folder} on disk was trained "
                             f"on base {base}: run the command without --report_only to merge the updates on disk")
        if merged_hash is not None and content_hash != merged_hash:
            raise ValueError(f"{path} merged another update than {folder} now holds (trained again since): run the "
                             f"command without --report_only to merge it again (unchanged merges reuse their points)")


def read_summaries(cfg: ReproduceConfig, group: str, folder: str) -> list[dict]:
    """A merge cell's summary.json for every seed, each searched on the validation images this command reads (a
    report never mixes two searches) and made from the updates now in its run folders."""
    out = []
    for seed in suite_seeds(cfg):
        path = merge_root(cfg, seed, group) / folder / "summary.json"
        summary = json.loads(path.read_text())
        searched = summary["config"]["val_limit"]
        if searched != cfg.val_limit:
            raise ValueError(f"{path} was searched on {_images(searched)}, this command reads {_images(cfg.val_limit)}"
                             f": pass --val_limit {'none' if searched is None else searched} to report it, or "
                             f"evaluate it again with this --val_limit (without --report_only)")
        check_merged_updates(path, summary)
        out.append(summary)
    return out


def cell_results(cfg: ReproduceConfig, cells: list, n_tasks: int) -> list[CellResults]:
    """Every seed's summaries of the given cells (those of one seed: one entry per group × cell)."""
    out = []
    for cell in cells:
        group, folder = Path(cell.output_dir).parent.name, Path(cell.output_dir).name
        out.append(CellResults(group, f"{cell.merge_method}/{cell.merge_space}", merge_size(group, n_tasks),
                               read_summaries(cfg, group, folder)))
    return out


def check_one_base(results: list[CellResults], base_fingerprint: str) -> None:
    """Refuses merges of updates on another base than the standalone table's: one report, one base."""
    for cell in results:
        for summary in cell.per_seed:
            merged_base = summary["provenance"]["base_fingerprint"]
            if merged_base != base_fingerprint:
                raise ValueError(f"{summary['config']['output_dir']} merged updates trained on base {merged_base}, "
                                 f"the standalone table's are on base {base_fingerprint}: one report never mixes two "
                                 f"bases; run the command without --report_only where the runs are")


def merge_results(cfg: ReproduceConfig, tasks: list[str]) -> list[CellResults]:
    return cell_results(cfg, merge_cells(dataclasses.replace(cfg, seeds=suite_seeds(cfg)[:1]), tasks), len(tasks))


def cost_claim(costs: list[float], n_tasks: int) -> dict:
    """The standalone bar; `costs`: each seed's fine-tuned − Trap² accuracy (points, mean over the tasks)."""
    cost = statistics.fmean(costs)
    return _claim(f"standalone cost (fine-tuned − Trap², mean over {n_tasks} tasks) ≤ {MAX_COST} points",
                  {f"cost {cost:.2f} ≤ {MAX_COST}": _condition([MAX_COST - c for c in costs])}, cost=_mean_std(costs))


def merge_claims(cfg: ReproduceConfig, cells: list[CellResults]) -> list[dict]:
    """Each merge claim with its numbers (in %, mean ± std over the seeds) and whether it holds, read on
    `cfg.claims_split`."""
    return [(all_task_claim if cell.group == "all-tasks" else two_task_claim)(cfg.target, cell, cfg.claims_split)
            for cell in cells if cell.group != "4-tasks"]  # 4 tasks: in the merge-size figure; the issue sets no bar


def standalone_costs(cfg: ReproduceConfig, tasks: list[str]) -> list[float]:
    """Each seed's fine-tuned − Trap² accuracy at s = 1 (points, mean over the tasks) on the claims' split:
    test from the standalone table, val from each update's own validation score."""
    if cfg.claims_split == "test":
        standalone = read_standalone_table(cfg, tasks)
        return [100 * (r[-1]["plain@1"] - r[-1]["trap2@1"]) for r in standalone["rows_by_seed"].values()]
    return [100 * statistics.fmean(validation_accuracy(cfg, task, False, seed) -
                                   validation_accuracy(cfg, task, True, seed) for task in tasks)
            for seed in suite_seeds(cfg)]


def scenario_numbers(target: str, cell: CellResults, split: str) -> dict:
    """The target's accuracy in each scenario and each scenario's mean over the merged tasks (%, mean ± std over
    the seeds). The control's task mean says whether merging gains anything unprotected; in a two-task merge the
    protected one says whether the attacker kept the target by giving its partner up."""
    kinds = ("zero-shot", "protected", "control")
    return {**{kind.replace("-", "_"): _mean_std(cell.target(kind, target, split)) for kind in kinds},
            **{f"{kind.replace('-', '_')}_task_mean": _mean_std([statistics.fmean(100 * a for a in accs.values())
                                                                for accs in cell.accuracies(kind, split)])
               for kind in kinds}}


def two_task_claim(target: str, cell: CellResults, split: str = "test") -> dict:
    """The issue's bar for a two-task merge: the protected target ≤ zero-shot + 2 while the control keeps ≥ 30 %
    of the target's fine-tuning gain over zero-shot (means over the seeds; the share's standard error from each
    seed's own share)."""
    numbers = scenario_numbers(target, cell, split)
    z, p, c = (numbers[kind]["mean"] for kind in ("zero_shot", "protected", "control"))
    finetuned_seeds = cell.finetuned(target, split)
    kept = _gain_kept(c, z, statistics.fmean(finetuned_seeds))
    seeds = list(zip(*(numbers[kind]["per_seed"] for kind in ("zero_shot", "protected", "control")), finetuned_seeds))
    return _claim(
        f"two-task merge {cell.group}, {cell.name}: protected {target} ≤ zero-shot + "
        f"{MAX_PAIR_TARGET_ABOVE_ZERO_SHOT} while the control keeps ≥ {MIN_CONTROL_GAIN_KEPT:.0%} of its gain",
        {f"protected {p:.2f} ≤ zero-shot + {MAX_PAIR_TARGET_ABOVE_ZERO_SHOT} = "
         f"{z + MAX_PAIR_TARGET_ABOVE_ZERO_SHOT:.2f}": _condition([zi + MAX_PAIR_TARGET_ABOVE_ZERO_SHOT - pi
                                                                   for zi, pi, _, _ in seeds]),
         f"control keeps {kept:.2%} ≥ {MIN_CONTROL_GAIN_KEPT:.0%} of its gain": _condition(
             [100 * (_gain_kept(ci, zi, fi) - MIN_CONTROL_GAIN_KEPT) for zi, _, ci, fi in seeds],
             margin=100 * (kept - MIN_CONTROL_GAIN_KEPT))},
        **numbers, control_gain_kept=kept)


def _gain_kept(merged: float, zero_shot: float, finetuned: float) -> float:
    """The share of the target's fine-tuning gain over zero-shot that a merge keeps (0 when there is no gain)."""
    return (merged - zero_shot) / (finetuned - zero_shot) if finetuned > zero_shot else 0.0


def all_task_claim(target: str, cell: CellResults, split: str = "test") -> dict:
    """The paper's bar for a merge of every task: the protected target ≤ zero-shot + 1 and below the control,
    and the protected scenario's task mean ≤ the zero-shot mean + 0.5 (means over the seeds)."""
    numbers = scenario_numbers(target, cell, split)
    z, p, c, mean, zero_mean = (numbers[key]["mean"] for key in ("zero_shot", "protected", "control",
                                                                  "protected_task_mean", "zero_shot_task_mean"))
    if "adaptive" in cell.per_seed[0]["scenarios"]["protected"]:
        numbers["protected_adaptive"] = _mean_std(
            [100 * s["scenarios"]["protected"]["adaptive"][split][target] for s in cell.per_seed])
    z_seeds, p_seeds, c_seeds, mean_seeds, zero_mean_seeds = (numbers[key]["per_seed"] for key in (
        "zero_shot", "protected", "control", "protected_task_mean", "zero_shot_task_mean"))
    return _claim(
        f"all-task merge, {cell.name}: protected {target} ≤ zero-shot + {MAX_TARGET_ABOVE_ZERO_SHOT} and below the "
        f"control; protected task mean ≤ zero-shot mean + {MAX_MEAN_ABOVE_ZERO_SHOT}",
        {f"protected {p:.2f} ≤ zero-shot + {MAX_TARGET_ABOVE_ZERO_SHOT} = {z + MAX_TARGET_ABOVE_ZERO_SHOT:.2f}":
             _condition([zi + MAX_TARGET_ABOVE_ZERO_SHOT - pi for zi, pi in zip(z_seeds, p_seeds)]),
         f"protected {p:.2f} < control {c:.2f}": _condition([ci - pi for ci, pi in zip(c_seeds, p_seeds)],
                                                            strict=True),
         f"task mean {mean:.2f} ≤ zero-shot mean + {MAX_MEAN_ABOVE_ZERO_SHOT} = "
         f"{zero_mean + MAX_MEAN_ABOVE_ZERO_SHOT:.2f}": _condition(
             [zi + MAX_MEAN_ABOVE_ZERO_SHOT - mi for zi, mi in zip(zero_mean_seeds, mean_seeds)])},
        **numbers)


def plot_merges(cfg: ReproduceConfig, n_tasks: int, results: list[CellResults], folder: Path) -> None:
    """merge-cells.png: the target after each all-task merge; merge-size.png: against the merge size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.pstdev(values)

    cells = [{"group": r.group, "cell": r.name, "size": r.size,
              **{kind: spread(r.target(kind, cfg.target)) for kind in ("zero-shot", "protected", "control")}}
             for r in results]
    colours = {"protected": "tab:red", "control": "tab:blue", "zero-shot": "0.4"}
    grid = [c for c in cells if c["group"] == "all-tasks"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(grid) + 2), 3.8))
    for i, kind in enumerate(("protected", "control")):
        ax.bar([j + (i - 0.5) * 0.38 for j in range(len(grid))], [c[kind][0] for c in grid], 0.38,
               yerr=[c[kind][1] for c in grid], color=colours[kind], label=kind)
    ax.plot(range(len(grid)), [c["zero-shot"][0] for c in grid], "_", ms=24, mew=2.5, color="k", zorder=3,
            label="zero-shot")
    low = min(min(c[k][0] for k in colours) for c in grid)
    ax.set_ylim(max(0.0, low - 5), None)
    ax.set_xticks(range(len(grid)), [c["cell"] for c in grid], rotation=60, ha="right")
    seeds = suite_seeds(cfg)
    ax.set(ylabel=f"{cfg.target} test accuracy (%)",
           title=f"{cfg.target} after merging all {n_tasks} tasks "
                 f"({'seed' if len(seeds) == 1 else 'mean ± std over seeds'} {', '.join(map(str, seeds))})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "merge-cells.png", dpi=110)
    plt.close(fig)

    studied = {c["cell"] for c in cells if c["group"] != "all-tasks"}  # the all-task grid has more cells
    cells = [c for c in cells if c["cell"] in studied]
    sizes = sorted({c["size"] for c in cells})
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for kind in ("protected", "control", "zero-shot"):
        means = [statistics.fmean(c[kind][0] for c in cells if c["size"] == n) for n in sizes]
        ax.plot(sizes, means, "o-", color=colours[kind], label=kind)
    ax.set(xlabel="tasks merged", ylabel=f"{cfg.target} test accuracy (%)", xticks=sizes,
           title=f"mean over {', '.join(sorted(studied))} and partner tasks")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "merge-size.png", dpi=110)
    plt.close(fig)


def write_claims(out: Path, cfg: ReproduceConfig, claims: list[dict], **extra) -> Path:
    """The claims judged on `cfg.claims_split`, with the settings and seeds they were judged on."""
    out.write_text(json.dumps({"config": dataclasses.asdict(cfg), "seeds": suite_seeds(cfg), "split": cfg.claims_split,
                               "claims": claims, "holds": sum(c["holds"] for c in claims), "of": len(claims), **extra},
                              indent=2))
    return out


def print_claims(claims: list[dict], split: str, out: Path, seeds: int) -> None:
    """The closing summary: claim by claim, whether it holds on `split`, what it misses and by how much (± the
    standard error of the seeds' mean), and how many misses are within that error (which one seed cannot give)."""
    failing = [c for c in claims if not c["holds"]]
    print(f"\nClaims on {'test' if split == 'test' else 'validation'} ({len(claims) - len(failing)} of "
          f"{len(claims)} hold; numbers in {out}):")
    for c in claims:
        print(f"  [{'holds' if c['holds'] else 'FAILS'}] {c['claim']}" + "".join(
            f"; not {u} (misses by {-c['margins'][u]['margin']:.2f} ± {c['margins'][u]['se']:.2f})" for u in c["unmet"]))
    if failing and seeds == 1:
        print("  one seed: no standard error says which misses other seeds could turn (pass --seeds)")
    elif failing:
        close = sum(all(-c["margins"][u]["margin"] < c["margins"][u]["se"] for u in c["unmet"]) for c in failing)
        print(f"  {close} of the {len(failing)} failing claims miss by less than one standard error of the seeds' mean")


def reproduce(cfg: ReproduceConfig) -> Path:
    start = time.time()
    tasks = cfg.tasks or list(PAPER_TASKS)
    jobs = cfg.jobs or default_jobs(cfg.device)
    pin_threads(resolve_device(cfg.device))  # as every stage computes, here or in the workers
    folder = results_folder(cfg)
    report = cfg.claims_split == "test"  # choosing on val: no table or figure of test numbers
    runs_on_disk = True  # trained below unless --report_only
    if cfg.report_only:
        runs_on_disk = runs_finished(cfg, tasks)
        if report and runs_on_disk:
            write_standalone_table(cfg, tasks)
        elif report:
            print(f"the runs are not all on disk: the standalone table is read as it is from {results_folder(cfg)}")
        missing = [c.output_dir for c in merge_cells(cfg, tasks) if not (Path(c.output_dir) / "summary.json").exists()]
        if missing:
            raise FileNotFoundError(f"--report_only: {len(missing)} merge cells have no summary.json (first: "
                                    f"{missing[0]}); run without --report_only to evaluate them")
    else:
        train_suite(cfg, report)
        seed = suite_seeds(cfg)[0]
        curve = CurveConfig(updates=[str(run_dir(cfg, cfg.target, protected, seed)) for protected in (False, True)],
                            s_step=0.1, device=cfg.device, output=str(folder / f"scaling_curve_{cfg.target}"))
        cells = sorted(merge_cells(cfg, tasks), key=lambda cell: "all-tasks" not in cell.output_dir)  # long ones first
        run_cells(cells, jobs, side_jobs=[(run_curve, curve)] if report else [])
    results = merge_results(cfg, tasks)
    base_fingerprint = (runs_provenance(cfg, tasks)[0] if runs_on_disk else
                        read_standalone_table(cfg, tasks)["provenance"]["base_fingerprint"])
    check_one_base(results, base_fingerprint)
    claims = [cost_claim(standalone_costs(cfg, tasks), len(tasks))] + merge_claims(cfg, results)
    out = write_claims(folder / ("claims.json" if report else "claims-val.json"), cfg, claims,
                       seconds=round(time.time() - start), provenance=provenance(base_fingerprint))
    if report:  # after claims.json: the tables show it
        build_tables(TablesConfig(results=str(folder), output=str(folder / "tables")))
        plot_merges(cfg, len(tasks), results, folder)
    print_claims(claims, cfg.claims_split, out, len(suite_seeds(cfg)))
    print(f"reproduction finished in {time.time() - start:.0f} s")
    return out


def main(argv=None) -> None:
    cfg = parse_config(ReproduceConfig, argv, __doc__.split("\n")[0])
    if cfg.print_commands:  # the merges and tables: this command again once the runs are done
        print_training_commands(cfg)
        return
    reproduce(cfg)


if __name__ == "__main__":
    run_cli(main)
