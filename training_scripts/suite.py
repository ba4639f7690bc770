"""Train a whole suite, every task unprotected and Trap²-protected, and write the standalone table.

    python -m training_scripts.suite --config configs/offline/vit_lora.yaml

Each run is skipped when its update already exists (and resumes from its checkpoint if it was
interrupted), so the command can simply be re-run after a crash. With `--seeds 420 421 422` every
run is repeated per seed and the table reports each task's mean over the seeds (one run's test
accuracy on these small tasks moves by a few points from seed to seed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from dataset.offline import PAPER_TASKS
from models.backbones import load_base
from models.options import option, parse_config
from models.runtime import cpu_model, default_jobs, provenance, run_cli, run_jobs
from models.updates import METADATA_FILE
from training_scripts.config import TrainConfig, run_name
from training_scripts.objective import ScaleSampler
from training_scripts.vision import REPORT_SCALES, train_vision


@dataclass
class SuiteConfig(TrainConfig):
    tasks: list[str] | None = option(None, "tasks to train; default: the eight paper tasks")
    seeds: list[int] | None = option(None, "seeds to train; the table averages every task over them (default: [seed])")
    lambda_reg: float = option(
        0.01, "λ of the protected runs (the unprotected ones use 0); default: the release's 0.01")
    runs_root: str = option(
        "runs", "where run folders go: <runs_root>/<suite>/<model>/<peft>/<task>-trap2|plain[-seed<N>]")
    # every run computes on one CPU thread, so its bits do not depend on jobs
    jobs: int | None = option(None, "runs trained at once, one process each (default: one per CPU core, 1 on a GPU)")
    # an experiment under another --runs_root gets its table next to its runs, never over the shipped one
    results: str | None = option(None, "table path without extension; default: results/<suite>/<model>/<peft>/"
                                       "standalone, or beside the runs for another --runs_root")
    print_commands: bool = option(
        False, "print one `python -m training_scripts ...` line per run (for a cluster scheduler) instead of training, "
               "in training order: the runs others read decoys from come first")
    decoys: int = option(
        0, "label-shuffled decoys trained per task (--shuffle_classes 1..N, unprotected, <task>-decoy<k>) and given to "
           "its Trap² run as --decoy_updates; needs --decoy_lambda > 0")
    protect_plain: bool = option(
        False, "each Trap² run starts from its task's unprotected run (--init_update): protect finished fine-tunes")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lambda_reg > 0:
            raise ValueError(f"--lambda_reg must be > 0: it is the protected runs' λ (the unprotected ones use 0), "
                             f"got {self.lambda_reg}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1 (or none: one per core), got {self.jobs}")
        if self.decoys < 0:
            raise ValueError(f"--decoys must be >= 0, got {self.decoys}")
        if self.decoys and self.decoy_updates:
            raise ValueError("--decoys trains the decoys the suite uses; drop --decoy_updates, or --decoys 0")
        if self.random_decoys and self.decoys:
            raise ValueError("--random_decoys and --decoys are two kinds of decoy: give one")
        if self.random_decoys_like:
            raise ValueError("--random_decoys_like names one run; the suite sizes each Trap² run's random decoys by "
                             "its own task's unprotected run: drop it")
        if self.init_update:
            raise ValueError("--init_update names one run; for a suite, --protect_plain true starts each Trap² run "
                             "from its own task's unprotected run")

    @property
    def has_decoys(self) -> bool:
        return super().has_decoys or self.decoys > 0


def suite_seeds(cfg: SuiteConfig) -> list[int]:
    return list(cfg.seeds or [cfg.seed])


def run_dir(cfg: SuiteConfig, task: str, protected: bool, seed: int | None = None, decoy: int | None = None) -> Path:
    """`<task>-plain|trap2` (or `<task>-decoy<k>`), with `-seed<N>` for every seed but the config's own (so the
    main runs keep the names the merge configs point at)."""
    name = run_name(task, protected) if decoy is None else f"{task}-decoy{decoy}"
    if seed is not None and seed != cfg.seed:
        name += f"-seed{seed}"
    return _suite_folder(Path(cfg.runs_root), cfg) / name


def _suite_folder(root: Path, cfg: SuiteConfig) -> Path:
    """`<root>/<suite>/<model>/<peft>`: where the suite's runs, and its tables, live under a root."""
    return root / cfg.suite / cfg.model / cfg.peft


def suite_runs(cfg: SuiteConfig, tasks: list[str], protected_tasks: list[str] | None = None) -> list[TrainConfig]:
    """Every run of the suite: the decoys (--decoys) first, as the Trap² runs read them; then the protected
    (longer: 1 + K passes a step) ones, so parallel workers finish together. `protected_tasks` (default: all)
    limits the Trap² runs and their decoys to the tasks a caller merges protected."""
    protected_tasks = tasks if protected_tasks is None else protected_tasks
    base_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    shared = {k: v for k, v in dataclasses.asdict(cfg).items() if k in base_fields}
    unprotected = {"lambda_reg": 0.0, "decoy_updates": None, "random_decoys": False, "decoy_lambda": 0.0}

    def decoy_dirs(task: str, seed: int) -> list[str]:
        return [str(run_dir(cfg, task, False, seed, decoy=k)) for k in range(1, cfg.decoys + 1)]

    decoys = [TrainConfig(**{**shared, **unprotected, "dataset": task, "seed": seed, "shuffle_classes": k,
                             "output_dir": folder})
              for seed in suite_seeds(cfg) for task in protected_tasks
              for k, folder in enumerate(decoy_dirs(task, seed), 1)]
    protected = [TrainConfig(**{**shared, "dataset": task, "seed": seed, "output_dir": str(run_dir(cfg, task, True, seed)),
                                **({"decoy_updates": decoy_dirs(task, seed)} if cfg.decoys else {}),
                                **({"random_decoys_like": str(run_dir(cfg, task, False, seed))} if cfg.random_decoys else {}),
                                **({"init_update": str(run_dir(cfg, task, False, seed))} if cfg.protect_plain else {})})
                 for seed in suite_seeds(cfg) for task in protected_tasks]
    plain = [TrainConfig(**{**shared, **unprotected, "dataset": task, "seed": seed,
                            "output_dir": str(run_dir(cfg, task, False, seed))})
             for seed in suite_seeds(cfg) for task in tasks]
    return decoys + protected + plain


def prepare_bases(cfg: SuiteConfig, runs: list[TrainConfig]) -> None:
    """Builds the base once, here (not by several workers at once), and says in one line where it, or a
    finished run, differs from the base the shipped table was made with: the numbers will then differ."""
    base = load_base(cfg.model, cfg.base_options)
    shipped = Path(f"{default_results(cfg)}.json")
    if shipped.exists():
        shipped_provenance = json.loads(shipped.read_text()).get("provenance", {})
        recorded = shipped_provenance.get("base_fingerprint")
        if recorded is None:
            print(f"note: {shipped} records no base fingerprint (made before results recorded one): "
                  f"its numbers need not come back here")
        elif recorded != base.fingerprint:
            shipped_cpu = shipped_provenance.get("cpu_model", "a CPU it does not record")
            print(f"note: base {cfg.model} here is {base.fingerprint} on {cpu_model()}, {shipped} was made with "
                  f"{recorded} on {shipped_cpu}: expect other numbers than the shipped table")
    for run in runs:
        meta = Path(run.output_dir) / METADATA_FILE
        if meta.exists() and json.loads(meta.read_text()).get("base_fingerprint") != base.fingerprint:
            print(f"note: {meta.parent} was trained on another base than {base.fingerprint}; retrain it with "
                  f"--overwrite true (or remove the folder) before merging")


def run_command(run: TrainConfig) -> str:
    """The shell line that trains `run` alone: every setting that differs from the trainer's default."""
    defaults = dataclasses.asdict(TrainConfig())
    parts = ["python", "-m", "training_scripts"]
    for name, value in dataclasses.asdict(run).items():
        if value == defaults[name]:
            continue
        parts.append(f"--{name}")
        if isinstance(value, list):
            parts += [str(v) for v in value]
        elif isinstance(value, dict):
            parts.append(json.dumps(value))
        else:
            parts.append("none" if value is None else str(value))
    return shlex.join(parts)


def _train_unreported(run: TrainConfig) -> Path:
    """A run whose printed summary (test accuracies in it) is swallowed: for choosing on validation."""
    with contextlib.redirect_stdout(io.StringIO()):
        return train_vision(run)


def training_phases(runs: list[TrainConfig]) -> tuple[list[TrainConfig], list[TrainConfig]]:
    """The runs other runs read (shuffled decoys; unprotected runs that size random decoys or that Trap² runs
    start from), then the rest."""
    read = {str(Path(folder)) for run in runs for folder in run.source_runs}
    return ([run for run in runs if str(Path(run.output_dir)) in read],
            [run for run in runs if str(Path(run.output_dir)) not in read])


def train_runs(runs: list[TrainConfig], jobs: int, report: bool = True) -> None:
    """Trains the runs, `jobs` at a time in worker processes (in this process when jobs = 1); `report`:
    print each run's summary (false when choosing on validation: it holds test accuracies).

    A finished run is skipped and an interrupted one resumes, so after a crash the same command
    continues; the first failure stops the rest and names its run.
    """
    if jobs > 1:
        runs = [dataclasses.replace(run, progress=False) for run in runs]  # one bar for all
    for phase in training_phases(runs):
        if phase:
            run_jobs(train_vision if report else _train_unreported, phase, jobs, f"training {len(phase)} runs",
                     lambda run: Path(run.output_dir).name)


def train_suite_runs(cfg: SuiteConfig, report: bool = True, protected_tasks: list[str] | None = None) -> list[str]:
    """Every run of the suite (finished ones are kept), the Trap² ones only for `protected_tasks` (default:
    all); its tasks. `report` false (choosing on validation) prints no test number."""
    tasks = cfg.tasks or list(PAPER_TASKS)
    runs = suite_runs(cfg, tasks, protected_tasks)
    prepare_bases(cfg, runs)
    train_runs(runs, cfg.jobs or default_jobs(cfg.device), report)
    return tasks


def train_suite(cfg: SuiteConfig, report: bool = True) -> Path | None:
    """Every run of the suite, then its standalone table; `report` false (choosing on validation) prints and
    writes no test number, so no table."""
    tasks = train_suite_runs(cfg, report)
    return write_standalone_table(cfg, tasks) if report else None


def _mean_row(rows: list[dict], task: str) -> dict:
    """The rows' column-wise mean, labelled `task`."""
    return {"task": task, **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "task"}}


def _with_mean(rows: list[dict]) -> list[dict]:
    return rows + [_mean_row(rows, "mean")]


def _finished_run(folder: Path) -> dict:
    if not (folder / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no finished update; run the suite command again (with the same "
                                f"--runs_root, --tasks and --seeds) to train it first")
    return json.loads((folder / METADATA_FILE).read_text())


def runs_finished(cfg: SuiteConfig, tasks: list[str]) -> bool:
    """Whether every update of the suite's seeds and tasks (plain and Trap²) is finished on disk."""
    return all((run_dir(cfg, task, protected, seed) / METADATA_FILE).is_file()
               for seed in suite_seeds(cfg) for task in tasks for protected in (False, True))


def read_standalone_table(cfg: SuiteConfig, tasks: list[str]) -> dict:
    """The standalone table's .json as write_standalone_table wrote it, checked to cover exactly these seeds
    and tasks (a clone holding results/ but not the runs reads it instead of rebuilding it)."""
    path = Path(f"{cfg.results or default_results(cfg)}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing and the runs it is made from are not all on disk; run the "
                                f"command without --report_only to train them")
    table = json.loads(path.read_text())
    seeds, table_seeds = [str(s) for s in suite_seeds(cfg)], list(table.get("rows_by_seed", {}))
    table_tasks = [row["task"] for row in table.get("rows", [])[:-1]]
    if table_seeds != seeds or table_tasks != tasks:
        raise ValueError(f"{path} holds seeds {table_seeds} and tasks {table_tasks}, not seeds {seeds} and tasks "
                         f"{tasks}; pass the --seeds and --tasks it was made with, or --results for another table")
    return table


def validation_accuracy(cfg: SuiteConfig, task: str, protected: bool, seed: int) -> float:
    """A finished update's validation accuracy at s = 1 (the split a default's hyperparameters are chosen on)."""
    return _finished_run(run_dir(cfg, task, protected, seed))["val_accuracy"]


def _seed_rows(cfg: SuiteConfig, tasks: list[str], seed: int) -> list[dict]:
    rows = []
    for task in tasks:
        plain, trap2 = (_finished_run(run_dir(cfg, task, protected, seed)) for protected in (False, True))
        row = {"task": task, "zero_shot": plain["zero_shot_test_accuracy"]}
        for tag, meta in (("plain", plain), ("trap2", trap2)):
            for s in REPORT_SCALES[1:]:
                row[f"{tag}@{s:g}"] = meta["test_by_scale"][f"{s:g}"]["accuracy"]
        rows.append(row)
    return _with_mean(rows)


def _markdown_table(rows: list[dict], first: str = "task") -> list[str]:
    cols = [c for c in rows[0] if c != first]
    lines = [f"| {first} | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    return lines + ["| " + " | ".join([str(r[first])] + [f"{100 * r[c]:.1f}" for c in cols]) + " |" for r in rows]


def default_results(cfg: SuiteConfig) -> Path:
    """results/<suite>/<model>/<peft>/standalone (the config's seed) or standalone-seeds<N>-... (others); for
    runs under another --runs_root, next to those runs, so an experiment never overwrites a shipped table."""
    root = Path("results") if Path(cfg.runs_root) == Path(SuiteConfig.runs_root) else Path(cfg.runs_root)
    seeds = suite_seeds(cfg)
    name = "standalone" if seeds == [cfg.seed] else "standalone-seeds" + "-".join(map(str, seeds))
    return _suite_folder(root, cfg) / name


def runs_provenance(cfg: SuiteConfig, tasks: list[str]) -> tuple[str, list]:
    """The one base every run of the table was trained on (runs of several bases are refused), and the
    CPU thread counts they computed with."""
    bases: dict[str, list[str]] = {}
    threads = set()
    for seed in suite_seeds(cfg):
        for task in tasks:
            for protected in (False, True):
                folder = run_dir(cfg, task, protected, seed)
                meta = _finished_run(folder)
                bases.setdefault(meta.get("base_fingerprint"), []).append(folder.name)
                threads.add(meta.get("provenance", {}).get("threads"))
    if len(bases) > 1:
        raise ValueError(f"the runs of this table were trained on different bases "
                         f"({ {fp: runs[:3] for fp, runs in bases.items()} }); retrain the stale ones with "
                         f"--overwrite true, so that one row never mixes bases")
    return next(iter(bases)), sorted(threads, key=str)


def write_standalone_table(cfg: SuiteConfig, tasks: list[str]) -> Path:
    """standalone.{md,json}: each task's test accuracy at the report's scales, also printed."""
    seeds = suite_seeds(cfg)
    base_fingerprint, threads = runs_provenance(cfg, tasks)
    per_seed = {seed: _seed_rows(cfg, tasks, seed) for seed in seeds}
    rows = _with_mean([_mean_row([per_seed[seed][i] for seed in seeds], task) for i, task in enumerate(tasks)])
    out = Path(cfg.results or default_results(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    over = f", mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f", seed {seeds[0]}"
    departures = f", off-scale loss capped at {cfg.off_loss_cap:g}" if cfg.off_loss_cap is not None else ""
    if cfg.has_decoys:  # which goes with decoy_lambda > 0 (checked by the config)
        kind = "random decoys" if cfg.random_decoys else "decoy partners"
        departures += f", {kind} at λ_d = {cfg.decoy_lambda:g} (m ∈ [{cfg.decoy_scale[0]:g}, {cfg.decoy_scale[1]:g}])"
    lines = [f"Standalone test accuracy (%) of {cfg.model} {cfg.peft} updates at scale s (W0 + s·ΔW); "
             f"Trap² λ = {cfg.lambda_reg}, w(s) = {cfg.rand_alpha_weight}, K = {cfg.scale_samples}, "
             f"s ∈ {ScaleSampler(cfg.rand_alpha_min, cfg.rand_alpha_max, cfg.band)}{departures}{over}. "
             f"s = 1 is the released update; s = 0 is the frozen base. Base {base_fingerprint}, "
             f"CPU threads per run: {', '.join(map(str, threads))}.", ""]
    lines += _markdown_table(rows)
    if len(seeds) > 1:
        summary = [{"seed": seed, **{k: v for k, v in per_seed[seed][-1].items() if k != "task"},
                    "cost": per_seed[seed][-1]["plain@1"] - per_seed[seed][-1]["trap2@1"]} for seed in seeds]
        lines += ["", "Task means of each seed (cost = plain@1 − trap2@1):", ""] + _markdown_table(summary, "seed")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{out}.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows,
                                               "rows_by_seed": {str(k): v for k, v in per_seed.items()},
                                               "provenance": {**provenance(base_fingerprint), "threads": threads}},
                                              indent=2))
    print("\n".join(lines))
    return Path(f"{out}.md")


def print_training_commands(cfg: SuiteConfig) -> None:
    """--print_commands: one line per run, in training order; each line trains one run."""
    phases = training_phases(suite_runs(cfg, cfg.tasks or list(PAPER_TASKS)))
    print("\n".join(run_command(run) for phase in phases for run in phase))


def main(argv=None) -> None:
    cfg = parse_config(SuiteConfig, argv, "Train every task of a suite, unprotected and Trap²-protected.")
    if cfg.print_commands:  # the table: this command again once they are done
        print_training_commands(cfg)
        return
    train_suite(cfg)


if __name__ == "__main__":
    run_cli(main)
