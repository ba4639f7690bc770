"""The paper's merge evaluation: pre-merge pass, linear search on validation, test report.

For each scenario (the protected target merged with unprotected others, and the all-unprotected
control) the attacker gets the best global coefficient c ∈ {0.1, …, 9.9} (stopping after
`patience` non-improving points), then the method's own grid in order (top-K, DARE p, CART rank),
all selected by mean normalised validation accuracy; the selected merge is reported on test.
Optionally an adaptive attacker also searches a coefficient for the target update alone.

Every evaluated point (validation points and the selected merges' test reports) is one JSON line,
appended in a single write; a rerun reads them back and skips what is done, so an interrupted sweep
resumes where it stopped and a finished one evaluates nothing. Below the points, the accuracies of
each distinct set of merged weights are shared by every cell of a merge set (EvaluationCache), so a
merge that another cell or phase already scored is read, not recomputed.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from eval_scripts.evaluators import Evaluator, evaluator_for
from eval_scripts.merge_statistics import GramProvider
from eval_scripts.peft_merge import PeftMerger
from models.defences import realigned_update, transformer_blocks
from models.options import check_choice, option
from models.runtime import pin_threads, provenance, resolve_device
from models.storage import FolderLock, append_jsonl, atomic_path, read_jsonl
from models.updates import ReleasedUpdate, UpdateError, fingerprint, load_update
from task_merger import TaskMerger, get_merge_method

SCENARIOS = ("protected", "control")
# Part of every logged point's key: bump it when the protocol changes what a point's numbers mean
PROTOCOL_VERSION = 2


@dataclass
class MergeConfig:
    target: str = option("", "task name of the protected update")
    protected: list[str] | None = option(None, "the protected target update folder(s)")
    control: list[str] | None = option(None, "the unprotected target update folder(s), for the all-unprotected control")
    others: list[str] | None = option(None, "unprotected update folders of the other tasks")
    protected_others: list[str] | None = option(
        None, "protected updates of the other tasks, used instead of `others` in the protected scenario (the "
              "release's math scenario protects both adapters); the control keeps `others`")
    merge_method: str = option("tv", "tv, ties, dare_ties, tsv, cart (or any registered method)")
    merge_space: str = option("full", "full, knots or core")
    isotropize: bool = option(False, "replace each merged matrix's singular values by their mean (Iso-C)")
    realign: bool = option(
        False, "the attacker first realigns every update to the base through the attention-head and MLP symmetries "
               "(undoing post-hoc re-parameterisations such as PaRaMS and Merge-Lock); merges in full or knots space")
    coef_start: float = option(0.1, "first merge coefficient c searched")
    coef_stop: float = option(9.9, "last merge coefficient c searched")
    coef_step: float = option(0.1, "step of the coefficient search")
    patience: int = option(10, "coefficients without improvement before the search stops")
    method_grid: bool = option(True, "search the method's own hyperparameters after c")
    search_rule: str = option(
        "strict", "strict: a point must score strictly higher (the first of a tie is kept), a method grid must beat "
                  "the best so far, top-K before DARE p (our offline results); release: a tie counts as an "
                  "improvement (plateaus walked, the last tie kept), each method grid restarts its best, DARE p "
                  "before top-K (the authors' release; the paper configs)")
    ties_trim: str = option(
        "spec", "spec: TIES keeps int(d·K) entries per tensor (the reference spec); release: int(d·K) + 1, "
                "as the authors' code (the paper configs)")
    normaliser: str = option(
        "own", "own: each update's standalone accuracy on the same split; control: one constant per task, the "
               "unprotected update's standalone test accuracy, for both splits and scenarios (the release)")
    normalise: bool = option(
        True, "select by mean accuracy normalised by each update's standalone one (vision); false: raw mean, "
              "as the release scores math")
    adaptive: bool = option(False, "also search a separate coefficient for the target update (an adaptive attacker)")
    val_limit: int | None = option(None, "evaluate on the first N validation images per task (speed)")
    statistics_examples: int = option(
        128, "RegMean / Chain of Merges: unlabelled training examples per task for each layer's input Gram matrix")
    eval_batch_size: int = option(512, "batch size of evaluation")
    data_root: str | None = option(None, "vision8: where the datasets lie here (default: as each update was trained)")
    base_options: dict | None = option(
        None, "the base's options, e.g. {pretrained: /local/folder}; default: the updates' recorded offline recipe "
              "(an update never chooses a path, hub id or revision, nor starts pretraining)")
    num_workers: int | None = option(None, "data-loading processes")
    seed: int = option(0, "seed of random merges (DARE's drop masks)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    output_dir: str | None = option(None, "default: results/<suite>/<model>/<kind>/<target>/<method>-<space>")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("coef_start", "coef_stop", "coef_step"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a finite number > 0, got {value!r}")
        if self.coef_start > self.coef_stop:
            raise ValueError(f"--coef_start {self.coef_start} is past --coef_stop {self.coef_stop}; swap them")
        for name in ("patience", "eval_batch_size", "statistics_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        check_choice("search_rule", self.search_rule, ("strict", "release"))
        check_choice("ties_trim", self.ties_trim, ("spec", "release"))
        check_choice("normaliser", self.normaliser, ("own", "control"))
        if self.realign and (self.merge_space == "core" or get_merge_method(self.merge_method).peft_combination):
            raise ValueError("--realign turns every update into a full one: merge in full or knots space, with one "
                             "of our methods (not core space, not peft_*)")
        if self.val_limit is not None and self.val_limit < 1:
            raise ValueError(f"--val_limit must be >= 1 (or none for the whole split), got {self.val_limit}")

    def coefficients(self) -> list[float]:
        n = int(round((self.coef_stop - self.coef_start) / self.coef_step)) + 1
        return [round(self.coef_start + i * self.coef_step, 6) for i in range(n)]


class PointLog:
    """points.jsonl: one line per evaluated point, appended in a single write (resumable)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {rec["key"]: rec for rec in read_jsonl(path) if "key" in rec}

    def write(self, record: dict) -> None:
        self.done[record["key"]] = record
        append_jsonl(self.path, record)


class EvaluationCache:
    """evaluations.jsonl next to a merge set's cells: each task's accuracy under every set of weights scored
    there, keyed by what it depends on (the merged ΔW's fingerprint, c, split, data, evaluation settings).
    Task Arithmetic in another space, a method grid's default value and the adaptive attacker at 1 are
    merges already scored: they are read, not recomputed. Cells running at once share it: a miss first
    reads the lines other processes appended since (complete lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.known = path, 0, {}

    def _read_new(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:  # a torn line was cut off after a crash: read again from the start
            self.offset = 0
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(size - self.offset)
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
                self.known[record["key"]] = record["accuracies"]
            except (ValueError, KeyError, TypeError):
                continue
        self.offset += end

    def accuracies(self, key: str, evaluate) -> dict[str, float]:
        """The logged accuracies of `key`, else `evaluate()`'s, logged for every cell."""
        if key not in self.known:
            self._read_new()
        if key not in self.known:
            self.known[key] = evaluate()
            append_jsonl(self.path, {"key": key, "accuracies": self.known[key]})
        return self.known[key]


def normalised(accs: dict[str, float], split: str, finetuned: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per-task normalised accuracy: 100 · acc / the task's standalone (fine-tuned) accuracy."""
    return {t: 100 * a / max(finetuned[t][split], 1e-8) for t, a in accs.items()}


def selection_score(accs: dict[str, float], finetuned: dict[str, dict[str, float]], normalise: bool) -> float:
    """What the attacker maximises on validation: mean normalised accuracy, or the raw mean (in %)."""
    if normalise:
        return mean_normalised(accs, "val", finetuned)
    return 100 * sum(accs.values()) / len(accs)


def mean_normalised(accs: dict[str, float], split: str, finetuned: dict[str, dict[str, float]]) -> float:
    values = normalised(accs, split, finetuned)
    return sum(values.values()) / len(values)


def _key(**parts) -> str:
    return json.dumps(parts, sort_keys=True)


def patient_search(values, score, patience: int, start: tuple = (None, -1.0), on_point=None,
                   ties_improve: bool = False) -> tuple:
    """Scores `values` in order and returns the best (value, score): a strictly higher score wins (of a tie
    the first is kept; with `ties_improve`, as the release does, a tie wins too, so plateaus are walked and
    the last tie kept), and the walk stops after `patience` points in a row without a win."""
    best_value, best_score = start
    bad = 0
    for value in values:
        current = score(value)
        if current > best_score or (ties_improve and current == best_score):
            best_value, best_score, bad = value, current, 0
        else:
            bad += 1
        if on_point is not None:
            on_point(value, best_value, best_score)
        if bad >= patience:
            break
    return best_value, best_score


RELEASE_GRID_ORDER = ("p", "top_k", "rank")  # the release: DARE p (top-K held), then top-K, then CART rank


def method_grid_search(grid: dict[str, list], params: dict, best_score: float, score, rule: str) -> tuple[dict, float]:
    """The method's own hyperparameters, one whole grid after the other at the chosen c (`score(name, params)`).
    strict: in registry order, a value must beat the best score so far; release: p, top-K, rank, each grid
    restarting its best from zero and keeping the last tie."""
    params = dict(params)
    release = rule == "release"
    for name in sorted(grid, key=RELEASE_GRID_ORDER.index) if release else grid:
        params[name], best_score = patient_search(
            grid[name], lambda value: score(name, {**params, name: value}), len(grid[name]) + 1,
            (params[name], -1.0 if release else best_score), ties_improve=release)
    return params, best_score


def make_merger(evaluator: Evaluator, updates: list[ReleasedUpdate], cfg: MergeConfig,
                task_coefficients: list[float] | None = None, grams: GramProvider | None = None):
    """The merger of the config's method: PEFT's for peft_* methods, ours otherwise; a data-dependent method
    gets its input statistics (computed with every coefficient 1, unless `grams` are handed on)."""
    method = get_merge_method(cfg.merge_method)
    if method.peft_combination:
        if cfg.merge_space != "full":
            raise ValueError(f"{cfg.merge_method} merges in PEFT's own factor space; use --merge_space full")
        return PeftMerger(updates, evaluator.net, task_coefficients, cfg.seed)
    merger = TaskMerger(updates, cfg.merge_space, task_coefficients, cfg.seed, cfg.ties_trim == "release", grams)
    if method.statistics and grams is None:
        merger.grams = GramProvider(evaluator, updates, method, cfg.statistics_examples,
                                    lambda name: merger.decomposition(name).coords)
    return merger


def search(evaluator: Evaluator, updates: list[ReleasedUpdate], cfg: MergeConfig, log: PointLog,
           scenario: str, finetuned: dict[str, dict[str, float]], target_index: int | None,
           evaluations: EvaluationCache) -> dict:
    """Coefficient search, then the method grid, then (optionally) the adaptive target coefficient."""
    from tqdm.auto import tqdm

    method = get_merge_method(cfg.merge_method)
    merger = make_merger(evaluator, updates, cfg)
    grams = merger.grams if isinstance(merger, TaskMerger) else None  # adaptive merges reuse the statistics
    identity = [u.content_hash for u in updates]  # a retrained update in the same folder is not a logged one
    # a data-dependent merge also depends on how many examples its statistics read
    statistics = {"statistics_examples": cfg.statistics_examples} if method.statistics else {}
    scored: dict[str, dict[str, float]] = {}  # each scored merge's validation accuracies, for the summary

    def point(phase: str, c: float, params: dict, merger_, task_coef: float = 1.0, split: str = "val") -> dict:
        """One merge's accuracies on a split (val: scored for the search; test: the report), logged."""
        key = _key(scenario=scenario, phase=phase, c=c, params=params, target_coefficient=task_coef,
                   method=cfg.merge_method, space=cfg.merge_space, isotropize=cfg.isotropize, updates=identity,
                   val_limit=cfg.val_limit, seed=cfg.seed, data=evaluator.data_key, protocol=PROTOCOL_VERSION,
                   normalise=cfg.normalise, normaliser=cfg.normaliser, ties_trim=cfg.ties_trim, **statistics,
                   **({"realign": True} if cfg.realign else {}))  # older logs keep their keys
        if key not in log.done:
            merged = merger_.merge(cfg.merge_method, isotropic=cfg.isotropize, **params)
            weights = _key(merged=fingerprint(merged), c=c, split=split, val_limit=cfg.val_limit if split == "val"
                           else None, tasks=sorted(evaluator.tasks), data=evaluator.data_key,
                           batch=cfg.eval_batch_size, device=next(evaluator.net.parameters()).device.type,
                           protocol=PROTOCOL_VERSION)

            def evaluate() -> dict[str, float]:
                evaluator.apply(merged, c)
                return evaluator.all_tasks(split)

            accs = evaluations.accuracies(weights, evaluate)
            record = {"key": key, "scenario": scenario, "phase": phase, "c": c, "params": params,
                      "target_coefficient": task_coef, split: accs}
            if split == "val":
                record["score"] = selection_score(accs, finetuned, cfg.normalise)
            log.write(record)
        if split == "val":
            scored[_key(c=c, params=params, target_coefficient=task_coef)] = log.done[key]["val"]
        return log.done[key]

    params = dict(method.defaults)
    bar = tqdm(cfg.coefficients(), desc=f"{scenario} {cfg.merge_method}/{cfg.merge_space} c", disable=not cfg.progress)
    release = cfg.search_rule == "release"
    best_c, best_score = patient_search(
        bar, lambda c: point("coefficient", c, params, merger)["score"], cfg.patience,
        on_point=lambda c, best, score: bar.set_postfix(c=c, best_c=best, score=f"{score:.1f}"), ties_improve=release)
    bar.close()
    if cfg.method_grid:
        params, best_score = method_grid_search(
            method.grid, params, best_score, lambda name, candidate: point(f"grid:{name}", best_c, candidate, merger)["score"],
            cfg.search_rule)
    result = {"c": best_c, "params": params, "val_score": best_score, "target_coefficient": 1.0,
              "val": scored[_key(c=best_c, params=params, target_coefficient=1.0)]}
    result["test"] = point("test", best_c, params, merger, split="test")["test"]
    result["test_normalised"] = normalised(result["test"], "test", finetuned)
    result["fallbacks"] = sorted(set(merger.fallbacks))

    if cfg.adaptive and target_index is not None:
        def adaptive_point(a: float) -> float:
            coefs = [a if i == target_index else 1.0 for i in range(len(updates))]
            return point("adaptive", best_c, params, make_merger(evaluator, updates, cfg, coefs, grams), a)["score"]

        best_a, best_a_score = patient_search(cfg.coefficients(), adaptive_point, cfg.patience, (1.0, best_score),
                                              ties_improve=release)
        coefs = [best_a if i == target_index else 1.0 for i in range(len(updates))]
        test = point("test:adaptive", best_c, params, make_merger(evaluator, updates, cfg, coefs, grams), best_a,
                     split="test")["test"]
        result["adaptive"] = {"target_coefficient": best_a, "val_score": best_a_score,
                              "val": scored[_key(c=best_c, params=params, target_coefficient=best_a)], "test": test,
                              "test_normalised": normalised(test, "test", finetuned)}
    return result


def _load_all(paths: list[str] | None) -> list[ReleasedUpdate]:
    return [load_update(p) for p in (paths or [])]


@dataclass
class MergeSetup:
    """What every cell of a merge config shares: its updates, output folder and evaluator."""

    scenarios: dict[str, list[ReleasedUpdate]]
    others: dict[str, list[ReleasedUpdate]]  # the other tasks' updates merged in each scenario
    all_updates: list[ReleasedUpdate]  # every scenario's target updates, then the others
    update_hashes: dict[str, str]  # folder -> content hash of the update read there (before any realignment)
    out: Path
    evaluator: Evaluator


def setup_merge(cfg: MergeConfig) -> MergeSetup:
    get_merge_method(cfg.merge_method)  # fail early on a typo
    if not cfg.target:
        raise ValueError("--target (the protected task's name) is required")
    scenarios = {"protected": _load_all(cfg.protected), "control": _load_all(cfg.control)}
    others = _load_all(cfg.others)
    if not scenarios["protected"] and not scenarios["control"]:
        raise ValueError("give --protected and/or --control update folders of the target task")
    for name, ups in scenarios.items():
        for u in ups:
            if u.task != cfg.target:
                raise UpdateError(f"{u.path} is an update of {u.task!r}, but --target is {cfg.target!r}")
            if (name == "protected") != u.protected:
                raise UpdateError(f"{u.path}: listed as {name} but it is {u.protection}")
    for u in others:
        if u.protected:
            raise UpdateError(f"{u.path}: the other tasks' updates must be unprotected, but it is {u.protection}")
    protected_others = _load_all(cfg.protected_others)
    for u in protected_others:
        if not u.protected:
            raise UpdateError(f"{u.path}: listed in --protected_others but it is {u.protection}")
    if protected_others and sorted(u.task for u in protected_others) != sorted(u.task for u in others):
        raise ValueError(f"--protected_others must cover the tasks of --others "
                         f"({sorted(u.task for u in others)}), got {sorted(u.task for u in protected_others)}")
    first = next(iter(scenarios["protected"] or scenarios["control"]))
    out = Path(cfg.output_dir or Path("results") / first.metadata["suite"] / first.metadata["base_model"] /
               first.kind / cfg.target / (f"{cfg.merge_method}-{cfg.merge_space}{'-iso' if cfg.isotropize else ''}"
                                          f"{'-realigned' if cfg.realign else ''}"))
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    pin_threads(device)
    all_updates = [u for ups in scenarios.values() for u in ups] + others + protected_others
    update_hashes = {str(u.path): u.content_hash for u in all_updates}
    evaluator = evaluator_for(all_updates, device, cfg)
    if cfg.realign:
        blocks = transformer_blocks(evaluator.net, first.metadata["base_model"])
        realigned = {id(u): realigned_update(u, evaluator.base_state, blocks) for u in all_updates}
        scenarios = {name: [realigned[id(u)] for u in ups] for name, ups in scenarios.items()}
        others, protected_others = [realigned[id(u)] for u in others], [realigned[id(u)] for u in protected_others]
        all_updates = [realigned[id(u)] for u in all_updates]
    return MergeSetup(scenarios, {"protected": protected_others or others, "control": others}, all_updates,
                      update_hashes, out, evaluator)


def pre_merge(setup: MergeSetup, cfg: MergeConfig) -> dict:
    """Zero-shot on every task, and each update alone on its own task (its standalone accuracy, which
    normalises the merged accuracies), per split.

    It does not depend on the merge method or space: one log per target folder, shared by the cells. The log
    keys the updates by their weights (`content_hash`), as the merge points, so updates moved to other folders
    reuse it; the returned "alone" names each update by its folder.
    """
    pre_log = PointLog(setup.out.parent / "pre_merge.jsonl")
    evaluator, all_updates = setup.evaluator, setup.all_updates
    pre = {"zero_shot": {}, "alone": {}}
    for split in ("val", "test"):
        key = _key(phase="pre-merge", split=split, updates=[u.content_hash for u in all_updates],
                   val_limit=cfg.val_limit if split == "val" else None, data=evaluator.data_key,
                   protocol=PROTOCOL_VERSION)
        if key not in pre_log.done:
            evaluator.apply(None)
            rec = {"zero_shot": evaluator.all_tasks(split), "alone": {}}
            for u in all_updates:
                evaluator.apply({n: u.delta(n) for n in u.names()}, 1.0)
                rec["alone"][u.content_hash] = {u.task: evaluator.accuracy(u.task, split)}
            pre_log.write({"key": key, "phase": "pre-merge", "split": split, **rec})
        pre["zero_shot"][split] = pre_log.done[key]["zero_shot"]
        pre["alone"][split] = {str(u.path): pre_log.done[key]["alone"][u.content_hash] for u in all_updates}
    return pre


def normalising_constants(pre: dict, merged: list[ReleasedUpdate], unprotected: list[ReleasedUpdate],
                          rule: str) -> dict[str, dict[str, float]]:
    """task -> split -> the accuracy a task's merged accuracy is divided by. own: each merged update's
    standalone accuracy on that split; control: the unprotected update's standalone test accuracy of the
    task, one constant for both splits and both scenarios (the release)."""
    if rule == "own":
        return {u.task: {s: pre["alone"][s][str(u.path)][u.task] for s in ("val", "test")} for u in merged}
    by_task = {u.task: pre["alone"]["test"][str(u.path)][u.task] for u in unprotected}
    missing = sorted({u.task for u in merged} - set(by_task))
    if missing:
        raise ValueError(f"--normaliser control needs an unprotected update of every task; missing {missing} "
                         f"(give --control)")
    return {u.task: {"val": by_task[u.task], "test": by_task[u.task]} for u in merged}


def merge_settings(cfg: MergeConfig) -> dict:
    """cfg's merge settings alone: a subclass's other options (a grid's, a recovery study's) left out, so a cell's
    summary records the same settings whichever command ran it."""
    names = {f.name for f in dataclasses.fields(MergeConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


def run_merge_eval(cfg: MergeConfig) -> Path:
    setup = setup_merge(cfg)
    lock = FolderLock(setup.out)  # one writer per sweep folder
    try:
        pre = pre_merge(setup, cfg)
        log = PointLog(setup.out / "points.jsonl")
        evaluations = EvaluationCache(setup.out.parent / "evaluations.jsonl")
        summary = {"config": merge_settings(cfg), "pre_merge": pre, "scenarios": {},
                   "update_hashes": setup.update_hashes,  # so a report can tell a folder trained again since
                   "provenance": provenance(setup.all_updates[0].metadata.get("base_fingerprint"))}
        for name, ups in setup.scenarios.items():
            if not ups:
                continue
            merged_updates = ups + setup.others[name]
            unprotected = setup.scenarios["control"] + setup.others["control"]
            finetuned = normalising_constants(pre, merged_updates, unprotected, cfg.normaliser)
            res = search(setup.evaluator, merged_updates, cfg, log, name, finetuned, target_index=0,
                         evaluations=evaluations)
            res["finetuned_test"] = {t: v["test"] for t, v in finetuned.items()}
            res["updates"] = [str(u.path) for u in merged_updates]
            summary["scenarios"][name] = res
        _write_outputs(setup.out, cfg, summary, log)
    finally:
        lock.release()
    return setup.out


def _write_outputs(out: Path, cfg: MergeConfig, summary: dict, log: PointLog) -> None:
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    rows = []
    for scenario, res in summary["scenarios"].items():
        variants = [("global", res)] + ([("adaptive", res["adaptive"])] if "adaptive" in res else [])
        for attacker, r in variants:
            for task, acc in r["test"].items():
                rows.append({"scenario": scenario, "attacker": attacker, "task": task, "method": cfg.merge_method,
                             "space": cfg.merge_space, "c": res["c"], "params": json.dumps(res["params"]),
                             "target_coefficient": r.get("target_coefficient", 1.0), "test_accuracy": round(acc, 4),
                             "test_normalised": round(r["test_normalised"][task], 2), "is_target": task == cfg.target})
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    latex = []
    for scenario, res in summary["scenarios"].items():
        accs = res["test"]
        cells = " & ".join(f"{100 * accs[t]:.1f}" for t in sorted(accs))
        latex.append(f"{cfg.merge_method} ({cfg.merge_space}, {scenario}) & {cells} & "
                     f"{100 * sum(accs.values()) / len(accs):.1f} \\\\")
    (out / "row.tex").write_text("% tasks: " + ", ".join(sorted(next(iter(summary["scenarios"].values()))["test"]))
                                 + "\n" + "\n".join(latex) + "\n")
    plot_curves(out / "curve.png", log, cfg)


def plot_curves(path: Path, log: PointLog, cfg: MergeConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mean, ax_target) = plt.subplots(1, 2, figsize=(10, 3.6))
    for scenario, style in zip(SCENARIOS, ("-", "--")):
        pts = sorted((r for r in log.done.values() if r.get("scenario") == scenario and r["phase"] == "coefficient"),
                     key=lambda r: r["c"])
        if not pts:
            continue
        cs = [r["c"] for r in pts]
        ax_mean.plot(cs, [r["score"] for r in pts], style, label=scenario)
        ax_target.plot(cs, [100 * r["val"][cfg.target] for r in pts], style, label=scenario)
    ax_mean.set(xlabel="merge coefficient c", ylabel="mean normalised val accuracy (%)",
                title=f"{cfg.merge_method} / {cfg.merge_space}")
    ax_target.set(xlabel="merge coefficient c", ylabel=f"{cfg.target} val accuracy (%)", title="target task")
    for ax in (ax_mean, ax_target):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
