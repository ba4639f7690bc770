import contextlib
import dataclasses
import csv
import json
from pathlib import Path

import pytest

from eval_scripts.linear_search import MergeConfig, run_merge_eval
from eval_scripts.scaling_curve import CurveConfig, scaling_curve, write_curve
from eval_scripts.tables import TablesConfig, build_tables
from models.updates import UpdateError


def merge_cfg(paths, out, **extra):
    args = dict(target="gtsrb", protected=[str(paths["gtsrb-trap2"])], control=[str(paths["gtsrb-plain"])],
                others=[str(paths["mnist-plain"])], coef_start=0.2, coef_stop=1.0, coef_step=0.4, patience=2,
                output_dir=str(out), progress=False)
    args.update(extra)
    return MergeConfig(**args)


@pytest.mark.parametrize("method,space", [("ties", "core"), ("tv", "knots")])
def test_merge_eval_end_to_end_and_resume(trained_updates, tmp_path, method, space):
    cfg = merge_cfg(trained_updates, tmp_path, merge_method=method, merge_space=space, adaptive=True)
    out = run_merge_eval(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scenarios"]) == {"protected", "control"}
    for res in summary["scenarios"].values():
        assert res["c"] in cfg.coefficients()
        assert set(res["test"]) == {"gtsrb", "mnist"}
        assert 0 <= res["test"]["gtsrb"] <= 1
        assert "adaptive" in res and res["adaptive"]["target_coefficient"] in cfg.coefficients() + [1.0]
    if method == "ties":  # the method grid ran after the coefficient search
        grid_points = [json.loads(l) for l in (out / "points.jsonl").read_text().splitlines()]
        assert any(p.get("phase") == "grid:top_k" for p in grid_points)
    for name in ("summary.csv", "row.tex", "curve.png"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["scenario"] for r in rows} == {"protected", "control"}
    md, tex = build_tables(TablesConfig(results=str(tmp_path)))
    table = md.read_text()
    assert f"| {method} | {space} |" in table and "protected lower?" in table
    assert "\\begin{tabular}" in tex.read_text()

    # a rerun evaluates nothing new: every point is read back from points.jsonl
    lines_before = (out / "points.jsonl").read_text().count("\n")
    import eval_scripts.evaluators as ev

    calls = []
    original = ev.Evaluator.all_tasks

    def counting(self, split):
        calls.append(split)
        return original(self, split)

    ev.Evaluator.all_tasks = counting
    try:
        run_merge_eval(cfg)
    finally:
        ev.Evaluator.all_tasks = original
    assert (out / "points.jsonl").read_text().count("\n") == lines_before
    assert calls == []  # the test reports are logged too: a finished sweep evaluates nothing
    assert json.loads((out / "summary.json").read_text())["scenarios"] == summary["scenarios"]


def test_merge_eval_rejects_mislabelled_inputs(trained_updates, tmp_path):
    swapped = merge_cfg(trained_updates, tmp_path, protected=[str(trained_updates["gtsrb-plain"])])
    with pytest.raises(UpdateError, match="listed as protected"):
        run_merge_eval(swapped)
    wrong_target = merge_cfg(trained_updates, tmp_path, target="mnist")
    with pytest.raises(UpdateError, match="--target"):
        run_merge_eval(wrong_target)
    with pytest.raises(KeyError, match="unknown merge method"):
        run_merge_eval(merge_cfg(trained_updates, tmp_path, merge_method="magic"))


def test_scaling_curve_writes_csv_and_png(trained_updates, tmp_path):
    cfg = CurveConfig(updates=[str(trained_updates["gtsrb-plain"]), str(trained_updates["gtsrb-trap2"])],
                      s_min=0.0, s_max=1.0, s_step=0.5)
    rows = scaling_curve(cfg)
    assert len(rows) == 6
    assert {r["protected"] for r in rows} == {True, False}
    # s = 0 is the frozen base for both updates
    zero = [r["accuracy"] for r in rows if r["scale"] == 0.0]
    assert zero[0] == zero[1]
    # s = 1 reproduces the accuracy recorded at training time
    meta = json.loads((trained_updates["gtsrb-plain"] / "trap2_update.json").read_text())
    one = next(r for r in rows if r["scale"] == 1.0 and not r["protected"])
    assert one["accuracy"] == pytest.approx(meta["test_by_scale"]["1"]["accuracy"])
    csv_path, png_path = write_curve(rows, tmp_path / "curve")
    assert csv_path.read_text().count("\n") == 7 and png_path.stat().st_size > 1000


def test_evaluate_limit_counts_images_not_batches(trained_updates):
    import torch

    from models.updates import load_update
    from models.vision import evaluate
    from eval_scripts.evaluators import VisionEvaluator

    ev = VisionEvaluator([load_update(trained_updates["gtsrb-plain"])], torch.device("cpu"), eval_batch_size=512)
    t = ev.tasks["gtsrb"]
    limited = evaluate(t.classifier, t.task, "val", 512, "cpu", limit=10)
    x, y = t.task.batch("val", torch.arange(10))
    with torch.no_grad():
        expected = (t.classifier(x).argmax(-1) == y).float().mean().item()
    assert limited["accuracy"] == pytest.approx(expected)
    # The limit cuts the batch list itself: no image past it is ever prepared.
    prepared = []
    original = t.task.batch
    t.task.batch = lambda split, indices: prepared.append(len(indices)) or original(split, indices)
    try:
        assert [len(y) for _, y in t.task.batches("val", 4, limit=10)] == [4, 4, 2]
    finally:
        del t.task.batch
    assert prepared == [4, 4, 2]


def test_standalone_table_from_suite_runs(trained_updates, tmp_path):
    from training_scripts.suite import SuiteConfig, write_standalone_table

    runs = tmp_path / "runs" / "offline" / "offline-vit" / "lora"
    runs.mkdir(parents=True)
    for name in ("gtsrb-plain", "gtsrb-trap2"):
        (runs / name).symlink_to(trained_updates[name])
    cfg = SuiteConfig(runs_root=str(tmp_path / "runs"), results=str(tmp_path / "results" / "standalone-lambda0.1"),
                      lambda_reg=0.1, band=0.2)
    md = write_standalone_table(cfg, ["gtsrb"])
    assert md.name == "standalone-lambda0.1.md"  # dotted names keep their full stem
    meta = json.loads((trained_updates["gtsrb-trap2"] / "trap2_update.json").read_text())
    assert f"{100 * meta['test_accuracy']:.1f}" in md.read_text().splitlines()[4]
    table = build_tables(TablesConfig(results=str(tmp_path / "results")))[0].read_text()
    assert (tmp_path / "results" / "tables-tradeoff.png").stat().st_size > 1000
    assert "s ∈ [0.05, 0.8] ∪ [1.2, 2]" in md.read_text().splitlines()[0]  # the sampler's support is named
    assert "decoys" not in md.read_text().splitlines()[0]
    cfg.random_decoys, cfg.decoy_lambda, cfg.decoy_scale = True, 0.1, [0.4, 0.8]
    header = write_standalone_table(cfg, ["gtsrb"]).read_text().splitlines()[0]
    assert "random decoys at λ_d = 0.1 (m ∈ [0.4, 0.8])" in header  # a departure the reader must see
    assert "| offline-vit | lora | 0.1 | inv | 1 | [0.05, 0.8] ∪ [1.2, 2] | default | 10000 | 2000 | 1 | 1 |" in table

    # A second seed: each task's entry becomes the mean over seeds, with a per-seed summary.
    for name in ("gtsrb-plain", "gtsrb-trap2"):
        other = json.loads((trained_updates[name] / "trap2_update.json").read_text())
        other["test_by_scale"]["1"]["accuracy"] = 0.5
        (runs / f"{name}-seed421").mkdir()
        (runs / f"{name}-seed421" / "trap2_update.json").write_text(json.dumps(other))
    cfg.seeds = [420, 421]
    data = json.loads(write_standalone_table(cfg, ["gtsrb"]).with_suffix(".json").read_text())
    assert data["rows"][0]["trap2@1"] == pytest.approx((meta["test_accuracy"] + 0.5) / 2)
    assert data["rows_by_seed"]["421"][-1]["trap2@1"] == 0.5
    assert "| 421 |" in (tmp_path / "results" / "standalone-lambda0.1.md").read_text()


def test_an_experiment_under_another_runs_root_never_writes_the_shipped_table():
    from training_scripts.suite import SuiteConfig, default_results

    main_runs = SuiteConfig(suite="offline", model="offline-vit", peft="full")
    assert default_results(main_runs) == Path("results/offline/offline-vit/full/standalone")
    experiment = SuiteConfig(suite="offline", model="offline-vit", peft="full", runs_root="runs/r7")
    assert default_results(experiment) == Path("runs/r7/offline/offline-vit/full/standalone")
    # another seed, alone or with others, never takes the config seed's table name
    assert default_results(SuiteConfig(seeds=[421])) == Path("results/offline/offline-vit/lora/standalone-seeds421")
    assert default_results(SuiteConfig(seeds=[420, 421])).name == "standalone-seeds420-421"


def test_a_retrained_update_in_the_same_folder_is_not_served_from_the_log(trained_updates, tmp_path):
    """Logged points are keyed by what a merge reads of the updates (weights and LoRA scaling, not the file's
    metadata), so resuming never mixes in stale results and a re-trained identical update reuses them."""
    import shutil

    from eval_scripts.linear_search import MergeConfig, run_merge_eval

    folder = tmp_path / "gtsrb-trap2"
    shutil.copytree(trained_updates["gtsrb-trap2"], folder)
    cfg = MergeConfig(target="gtsrb", protected=[str(folder)], others=[str(trained_updates["mnist-plain"])],
                      coef_stop=0.2, method_grid=False, output_dir=str(tmp_path / "merge"), progress=False)
    run_merge_eval(cfg)
    n_points = len((tmp_path / "merge" / "points.jsonl").read_text().splitlines())
    run_merge_eval(cfg)  # same contents: everything comes from the log
    assert len((tmp_path / "merge" / "points.jsonl").read_text().splitlines()) == n_points
    weights = folder / "adapter_model.safetensors"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    with safe_open(str(weights), "pt") as fh:
        metadata = fh.metadata()
    assert metadata["trap2_commit"]  # the same weights written at another commit are the same update
    save_file(tensors, str(weights), metadata={**metadata, "trap2_commit": "0123456789ab"})
    run_merge_eval(cfg)
    assert len((tmp_path / "merge" / "points.jsonl").read_text().splitlines()) == n_points
    adapter_config = folder / "adapter_config.json"  # α/r scales every ΔW: another α is another update
    config = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    run_merge_eval(cfg)
    assert len((tmp_path / "merge" / "points.jsonl").read_text().splitlines()) == 2 * n_points
    adapter_config.write_text(json.dumps(config))
    save_file({k: v * 1.5 if "lora_B" in k else v for k, v in tensors.items()}, str(weights))  # "retrained"
    run_merge_eval(cfg)
    assert len((tmp_path / "merge" / "points.jsonl").read_text().splitlines()) == 3 * n_points


def test_updates_moved_to_other_folders_reuse_the_logged_pre_merge_pass_and_points(trained_updates, tmp_path):
    import shutil

    moved = {}
    for name, path in trained_updates.items():
        moved[name] = tmp_path / "moved" / name
        shutil.copytree(path, moved[name])
    out = tmp_path / "sweeps" / "tv-full"
    first = json.loads((run_merge_eval(merge_cfg(trained_updates, out, method_grid=False)) / "summary.json")
                       .read_text())
    pre_log, points = (out.parent / "pre_merge.jsonl").read_text(), (out / "points.jsonl").read_text()
    again = json.loads((run_merge_eval(merge_cfg(moved, out, method_grid=False)) / "summary.json").read_text())
    assert (out.parent / "pre_merge.jsonl").read_text() == pre_log  # nothing evaluated again
    assert (out / "points.jsonl").read_text() == points
    for split in ("val", "test"):
        assert again["pre_merge"]["alone"][split] == {str(moved[name]): first["pre_merge"]["alone"][split][str(path)]
                                                      for name, path in trained_updates.items()}
    for scenario, chosen in again["scenarios"].items():
        assert all(Path(u).parent == tmp_path / "moved" for u in chosen.pop("updates"))  # named by where they lie now
        first["scenarios"][scenario].pop("updates")
    assert again["scenarios"] == first["scenarios"]


def test_cells_of_a_merge_set_share_evaluations(trained_updates, tmp_path, monkeypatch):
    """Task Arithmetic in core space merges to the full-space cell's weights, so it reads that cell's
    evaluations and scores nothing itself, with the same selections; within a cell, the adaptive attacker's
    point at 1 is the selected merge, read rather than recomputed."""
    import eval_scripts.evaluators as ev

    calls = []
    original = ev.Evaluator.all_tasks
    monkeypatch.setattr(ev.Evaluator, "all_tasks", lambda self, split: calls.append(split) or original(self, split))
    full = run_merge_eval(merge_cfg(trained_updates, tmp_path / "tv-full", adaptive=True))
    points = [json.loads(l) for l in (full / "points.jsonl").read_text().splitlines()]
    pre_merge_calls = 2  # zero-shot on val and test (each update alone is scored on its own task only)
    assert pre_merge_calls < len(calls) < pre_merge_calls + len(points)
    calls.clear()
    core = run_merge_eval(merge_cfg(trained_updates, tmp_path / "tv-core", merge_space="core", adaptive=True))
    assert calls == []
    summaries = [json.loads((out / "summary.json").read_text())["scenarios"] for out in (full, core)]
    assert summaries[0] == summaries[1]


def test_the_evaluation_cache_reads_complete_lines_of_other_writers(tmp_path):
    from eval_scripts.linear_search import EvaluationCache
    from models.storage import append_jsonl

    path = tmp_path / "evaluations.jsonl"
    mine, theirs = EvaluationCache(path), EvaluationCache(path)
    assert mine.accuracies("a", lambda: {"t": 0.5}) == {"t": 0.5}
    assert theirs.accuracies("a", lambda: pytest.fail("scored again")) == {"t": 0.5}
    append_jsonl(path, {"key": "b", "accuracies": {"t": 0.25}})
    with open(path, "a") as fh:
        fh.write('{"key": "c", "accur')  # another process mid-write
    assert mine.accuracies("b", lambda: pytest.fail("scored again")) == {"t": 0.25}
    assert mine.accuracies("c", lambda: {"t": 0.75}) == {"t": 0.75}  # the torn line is never taken
    assert EvaluationCache(path).accuracies("c", lambda: pytest.fail("scored again")) == {"t": 0.75}


def test_one_command_reproduction_writes_tables_figures_and_claims(tmp_path, monkeypatch, capsys):
    from conftest import TINY_BASE, TINY_SPLITS
    from eval_scripts.reproduce import CellResults, ReproduceConfig, merge_cells, merge_claims, merge_root, reproduce
    from training_scripts.suite import read_standalone_table, run_dir

    cfg = ReproduceConfig(tasks=["gtsrb", "mnist"], runs_root=str(tmp_path / "runs"), jobs=1, lambda_reg=0.1,
                          base_options=dict(TINY_BASE), split_sizes=dict(TINY_SPLITS), max_steps=6, eval_freq=3,
                          warmup_steps=2, batch_size=16, lr=3e-3, head_shots=4, progress=False, val_limit=32,
                          merge_methods=["tv"], merge_spaces=["full"], size_methods=["tv"], size_spaces=["core"])
    out = reproduce(cfg)
    report = json.loads(out.read_text())
    assert [c["claim"].split(",")[0] for c in report["claims"]] == [
        "standalone cost (fine-tuned − Trap²", "all-task merge", "two-task merge with-mnist"]
    assert report["holds"] == sum(c["holds"] for c in report["claims"]) and report["of"] == 3
    summary = json.loads((merge_root(cfg, 420, "all-tasks") / "tv-full" / "summary.json").read_text())
    all_tasks = report["claims"][1]
    assert all_tasks["protected"]["mean"] == pytest.approx(100 * summary["scenarios"]["protected"]["test"]["gtsrb"])
    control_test = summary["scenarios"]["control"]["test"]
    assert all_tasks["control_task_mean"]["mean"] == pytest.approx(100 * sum(control_test.values()) / len(control_test))
    p, c, z = (all_tasks[k]["mean"] for k in ("protected", "control", "zero_shot"))
    mean, zero_mean = all_tasks["protected_task_mean"]["mean"], all_tasks["zero_shot_task_mean"]["mean"]
    conditions = {f"protected {p:.2f} ≤ zero-shot + 1.0 = {z + 1:.2f}": p <= z + 1.0,
                  f"protected {p:.2f} < control {c:.2f}": p < c,
                  f"task mean {mean:.2f} ≤ zero-shot mean + 0.5 = {zero_mean + 0.5:.2f}": mean <= zero_mean + 0.5}
    assert all_tasks["holds"] == all(conditions.values())
    assert all_tasks["unmet"] == [text for text, met in conditions.items() if not met]
    assert all(claim["holds"] == (claim["unmet"] == []) for claim in report["claims"])
    folder = out.parent
    tables = (folder / "tables.md").read_text()
    assert "Post-merging" in tables
    # the claims, with their seed spread, in the tables too: one row per claim, its verdict and what it misses
    claims_table = tables.split(f"### Claims: claims.json ({report['holds']} of 3 hold; seeds 420;")[1].split("###")[0]
    rows = [line for line in claims_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3
    for row, claim in zip(rows, report["claims"]):
        cells = row.split(" | ")
        assert cells[0] == "| " + claim["claim"].split(":")[0] and ("yes" if claim["holds"] else "NO") in cells
    assert f"{all_tasks['protected']['mean']:.1f} ± 0.0" in rows[1]
    assert r"$\pm$" in (folder / "tables.tex").read_text()
    for figure in ("merge-cells.png", "merge-size.png", "tables-tradeoff.png", "scaling_curve_gtsrb.png"):
        assert (folder / figure).stat().st_size > 1000
    assert (merge_root(cfg, 420, "with-mnist") / "tv-core" / "summary.json").exists()

    # --report_only rebuilds the report from disk, training and merging nothing
    import eval_scripts.reproduce as rep

    def refuse(*args, **kwargs):
        raise AssertionError("--report_only trained or merged")

    for name in ("train_suite", "run_cells", "run_curve"):
        monkeypatch.setattr(rep, name, refuse)
    (folder / "claims.json").unlink()
    again = json.loads(reproduce(dataclasses.replace(cfg, report_only=True)).read_text())
    assert again["claims"] == report["claims"]
    # a report never pairs the runs on disk with merges of other updates: a run trained again since ...
    weights = [run_dir(cfg, "gtsrb", protected, 420) / "adapter_model.safetensors" for protected in (True, False)]
    swapped = [path.read_bytes() for path in weights][::-1]
    for path, data in zip(weights, swapped):
        path.write_bytes(data)
    with pytest.raises(ValueError, match=r"merged another update than \S*gtsrb-trap2 now holds \(trained again"):
        reproduce(dataclasses.replace(cfg, report_only=True))
    for path, data in zip(weights, swapped[::-1]):
        path.write_bytes(data)
    # ... or runs on another base (a summary from before update hashes were recorded is checked by its base)
    tampered = merge_root(cfg, 420, "with-mnist") / "tv-core" / "summary.json"
    original = tampered.read_text()
    older = json.loads(original)
    del older["update_hashes"]
    older["provenance"]["base_fingerprint"] = "0" * 16
    tampered.write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"merged updates trained on base 0{16}, but \S*gtsrb-trap2 on disk was trained "
                                         r"on base [0-9a-f]{16}: run the command without --report_only"):
        reproduce(dataclasses.replace(cfg, report_only=True))
    # a clone holding results/ but not the runs: the same claims, from the standalone table and merges on disk
    runs = [run_dir(cfg, task, protected, 420) for task in cfg.tasks for protected in (False, True)]
    for i, run in enumerate(runs):
        run.rename(tmp_path / f"run-elsewhere-{i}")
    (folder / "claims.json").unlink()
    with pytest.raises(ValueError, match=r"with-mnist/tv-core merged updates trained on base 0{16}, the standalone "
                                         r"table's are on base [0-9a-f]{16}: one report never mixes two bases"):
        reproduce(dataclasses.replace(cfg, report_only=True))
    tampered.write_text(original)
    without_runs = json.loads(reproduce(dataclasses.replace(cfg, report_only=True)).read_text())
    assert without_runs["claims"] == report["claims"]
    with pytest.raises(ValueError, match="searched on the first 32 validation images, this command reads every "
                                         "validation image: pass --val_limit 32"):
        reproduce(dataclasses.replace(cfg, report_only=True, val_limit=None))  # never a report of two searches
    assert without_runs["provenance"]["base_fingerprint"] == report["provenance"]["base_fingerprint"]
    with pytest.raises(ValueError, match=r"holds seeds \['420'\] .* not seeds \['420', '421'\]"):
        read_standalone_table(dataclasses.replace(cfg, seeds=[420, 421], results=str(folder / "standalone")),
                              cfg.tasks)
    # full fine-tunes have no Core space, known from the config when the runs are gone
    full = dataclasses.replace(cfg, peft="full", size_spaces=["full", "core"])
    assert {(Path(c.output_dir).parent.name, c.merge_space) for c in merge_cells(full, cfg.tasks)} == {
        ("all-tasks", "full"), ("with-mnist", "full")}
    with pytest.raises(ValueError, match="Core space needs LoRA factors"):
        merge_cells(dataclasses.replace(full, merge_spaces=["core"]), cfg.tasks)
    for i, run in enumerate(runs):
        (tmp_path / f"run-elsewhere-{i}").rename(run)
    missing = dataclasses.replace(cfg, report_only=True, merge_methods=["ties"])
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        reproduce(missing)

    # choosing on validation: the same claims from validation accuracies, and no test number printed or written
    capsys.readouterr()
    table = {path: path.read_text() for path in folder.glob("standalone*")}
    chosen = json.loads(reproduce(dataclasses.replace(cfg, report_only=True, claims_split="val")).read_text())
    printed = capsys.readouterr().out
    assert "Claims on validation" in printed and "Standalone test accuracy" not in printed
    assert table and {path: path.read_text() for path in folder.glob("standalone*")} == table
    assert chosen["split"] == "val" and (folder / "claims-val.json").exists()
    assert json.loads((folder / "claims.json").read_text())["claims"] == report["claims"]  # the report is kept
    points = [json.loads(line) for line in (merge_root(cfg, 420, "all-tasks") / "tv-full" / "points.jsonl")
              .read_text().splitlines()]
    for scenario in ("protected", "control"):
        pick = summary["scenarios"][scenario]
        scored = [p["val"] for p in points if p["scenario"] == scenario and "val" in p and p["c"] == pick["c"]
                  and p["params"] == pick["params"] and p["target_coefficient"] == 1.0]
        assert pick["val"] == scored[0]
        assert chosen["claims"][1][scenario]["mean"] == pytest.approx(100 * scored[0]["gtsrb"])
    adaptive = summary["scenarios"]["protected"]["adaptive"]
    assert chosen["claims"][1]["protected_adaptive"]["mean"] == pytest.approx(100 * adaptive["val"]["gtsrb"])
    zero_shot = summary["pre_merge"]["zero_shot"]["val"]["gtsrb"]
    assert chosen["claims"][1]["zero_shot"]["mean"] == pytest.approx(100 * zero_shot)
    val_accuracy = {(task, protected): json.loads((run_dir(cfg, task, protected, 420) / "trap2_update.json")
                                                  .read_text())["val_accuracy"]
                    for task in ("gtsrb", "mnist") for protected in (False, True)}
    cost = 100 * sum(val_accuracy[t, False] - val_accuracy[t, True] for t in ("gtsrb", "mnist")) / 2
    assert chosen["claims"][0]["cost"]["mean"] == pytest.approx(cost)
    pair = json.loads((merge_root(cfg, 420, "with-mnist") / "tv-core" / "summary.json").read_text())
    zero = 100 * pair["pre_merge"]["zero_shot"]["val"]["gtsrb"]
    control = 100 * pair["scenarios"]["control"]["val"]["gtsrb"]
    alone = 100 * pair["pre_merge"]["alone"]["val"][str(run_dir(cfg, "gtsrb", False, 420))]["gtsrb"]
    kept = (control - zero) / (alone - zero) if alone > zero else 0.0
    assert chosen["claims"][2]["control_gain_kept"] == pytest.approx(kept)
    protected_pair = pair["scenarios"]["protected"]["val"]  # the partner's fate is recorded beside the target's
    assert chosen["claims"][2]["protected_task_mean"]["mean"] == pytest.approx(
        100 * (protected_pair["gtsrb"] + protected_pair["mnist"]) / 2)
    del summary["scenarios"]["control"]["val"]  # a summary from before validation accuracies were kept
    with pytest.raises(ValueError, match="no val accuracies of its chosen merge"):
        merge_claims(dataclasses.replace(cfg, claims_split="val"), [CellResults("all-tasks", "tv/full", 2, [summary])])


def _val_summary(zero: dict, protected: dict, control: dict, finetuned: float = 0.9) -> dict:
    """A two-scenario merge summary with validation accuracies only (GTSRB's plain update alone: `finetuned`)."""
    return {"config": {"control": ["runs/gtsrb-plain"], "output_dir": "merge"},
            "pre_merge": {"zero_shot": {"val": zero}, "alone": {"val": {"runs/gtsrb-plain": {"gtsrb": finetuned}}}},
            "scenarios": {"protected": {"val": protected}, "control": {"val": control}}}


def test_claims_at_their_bar_hold_although_float_arithmetic_breaks_the_tie():
    """41.2 % zero-shot + 2 points is 43.2, yet 100 · 0.412 + 2 < 100 · 0.432 in floats: a claim exactly at its
    bar must hold, and one a single image over it must not."""
    from eval_scripts.reproduce import CellResults, merge_claims, ReproduceConfig

    cfg = ReproduceConfig(claims_split="val")
    assert not 100 * 0.432 <= 100 * 0.412 + 2.0 and not 100 * 0.246 <= 100 * 0.236 + 1.0
    at_bar = [CellResults("with-mnist", "tv/full", 2,
                          [_val_summary({"gtsrb": 0.412}, {"gtsrb": 0.432}, {"gtsrb": 0.8})]),
              CellResults("all-tasks", "tv/full", 2, [_val_summary({"gtsrb": 0.236, "mnist": 0.5},
                                                                   {"gtsrb": 0.246, "mnist": 0.5},
                                                                   {"gtsrb": 0.6, "mnist": 0.5})])]
    assert [c["holds"] for c in merge_claims(cfg, at_bar)] == [True, True]
    over = [CellResults("with-mnist", "tv/full", 2,
                        [_val_summary({"gtsrb": 0.412}, {"gtsrb": 0.436}, {"gtsrb": 0.8})]),
            CellResults("all-tasks", "tv/full", 2, [_val_summary({"gtsrb": 0.236, "mnist": 0.5},
                                                                 {"gtsrb": 0.25, "mnist": 0.5},
                                                                 {"gtsrb": 0.6, "mnist": 0.5})])]
    claims = merge_claims(cfg, over)
    assert [c["holds"] for c in claims] == [False, False]
    assert claims[0]["unmet"] == ["protected 43.60 ≤ zero-shot + 2.0 = 43.20"]
    # a control a hair under its bar (29.98 % of the gain) must not read as the bar itself in `unmet`
    short = [CellResults("with-mnist", "tv/full", 2, [_val_summary({"gtsrb": 0.412}, {"gtsrb": 0.412},
                                                                   {"gtsrb": 0.412 + 0.2998 * (0.9 - 0.412)})])]
    assert merge_claims(cfg, short)[0]["unmet"] == ["control keeps 29.98% ≥ 30% of its gain"]


def test_each_condition_reports_its_distance_to_the_bar_and_the_seeds_standard_error(capsys):
    """Three seeds of a two-task cell whose control keeps 25 / 40 / 20 % of GTSRB's gain: the verdict reads the
    pooled share, the margin is that share's distance to 30 % (in points of the share) and its error the per-seed
    shares' standard error; the summary says whether the miss is within that error."""
    import statistics

    from eval_scripts.reproduce import CellResults, ReproduceConfig, merge_claims, print_claims
    from eval_scripts.tables import _nearest_bar

    def summary(zero: float, protected: float, control: float, finetuned: float) -> dict:
        return _val_summary({"gtsrb": zero}, {"gtsrb": protected}, {"gtsrb": control}, finetuned)

    shares = [0.25, 0.40, 0.20]
    seeds = [summary(0.40, 0.41 + i / 100, 0.40 + share * 0.40, 0.80) for i, share in enumerate(shares)]
    claim, = merge_claims(ReproduceConfig(claims_split="val"), [CellResults("with-dtd", "ties/full", 2, seeds)])
    kept_text, protected_text = "control keeps 28.33% ≥ 30% of its gain", "protected 42.00 ≤ zero-shot + 2.0 = 42.00"
    assert claim["unmet"] == [kept_text] and claim["control_gain_kept"] == pytest.approx(sum(shares) / 3)
    kept = claim["margins"][kept_text]
    assert kept["margin"] == pytest.approx(100 * (sum(shares) / 3 - 0.3))
    assert kept["se"] == pytest.approx(100 * statistics.stdev(shares) / 3 ** 0.5)  # 5.8 points: the miss is within it
    protected = claim["margins"][protected_text]  # 41, 42, 43 % against 42 %: exactly at the bar, holds
    assert protected["margin"] == pytest.approx(0.0) and protected["se"] == pytest.approx(1 / 3 ** 0.5)
    assert _nearest_bar(claim["margins"]) == f"control keeps 28.33% ≥ 30%: -1.67 ± {kept['se']:.2f}"
    print_claims([claim], "val", Path("claims-val.json"), seeds=3)
    printed = capsys.readouterr().out
    assert f"not {kept_text} (misses by 1.67 ± {kept['se']:.2f})" in printed
    assert "1 of the 1 failing claims miss by less than one standard error" in printed
    # the same shares much closer together: the same miss, now outside the error
    tight = [summary(0.40, 0.41, 0.40 + share * 0.40, 0.80) for share in (0.28, 0.285, 0.285)]
    claim, = merge_claims(ReproduceConfig(claims_split="val"), [CellResults("with-dtd", "ties/full", 2, tight)])
    print_claims([claim], "val", Path("claims-val.json"), seeds=3)
    assert "0 of the 1 failing claims miss by less than one standard error" in capsys.readouterr().out
    # one seed has no error to weigh a miss against: the summary says so instead of counting
    claim, = merge_claims(ReproduceConfig(claims_split="val"), [CellResults("with-dtd", "ties/full", 2, tight[:1])])
    assert claim["margins"][claim["unmet"][0]]["se"] == 0.0
    print_claims([claim], "val", Path("claims-val.json"), seeds=1)
    printed = capsys.readouterr().out
    assert "one seed: no standard error" in printed and "failing claims miss" not in printed


def test_claims_split_is_checked_and_only_reproduce_and_attacks_judge_on_validation():
    from eval_scripts.attacks import AttacksConfig
    from eval_scripts.defences import DefencesConfig
    from eval_scripts.reproduce import ReproduceConfig

    for chooses in (ReproduceConfig, AttacksConfig):
        assert chooses().claims_split == "test" and chooses(claims_split="val").claims_split == "val"
        with pytest.raises(ValueError, match="--claims_split must be test or val"):
            chooses(claims_split="train")
    assert DefencesConfig().claims_split == "test"
    with pytest.raises(ValueError, match="--claims_split must be test for this command"):
        DefencesConfig(claims_split="val")


def test_reproduce_searches_every_validation_image_unless_told(tmp_path):
    """The paper's protocol: the merge coefficient is chosen on the whole validation split."""
    from eval_scripts.reproduce import ReproduceConfig, merge_cells

    cfg = ReproduceConfig(tasks=["gtsrb", "mnist", "svhn"], runs_root=str(tmp_path), results=str(tmp_path / "s"))
    cells = merge_cells(cfg, cfg.tasks)
    assert cells and {c.val_limit for c in cells} == {None}
    limited = merge_cells(dataclasses.replace(cfg, val_limit=250), cfg.tasks)
    assert len(limited) == len(cells) and {c.val_limit for c in limited} == {250}


def test_patient_search_keeps_the_first_of_a_tie_and_stops_after_patience():
    from eval_scripts.linear_search import patient_search

    surface = {0.1: 1.0, 0.2: 3.0, 0.3: 3.0, 0.4: 2.0, 0.5: 2.5, 0.6: 9.0}
    seen = []
    best = patient_search(surface, lambda c: seen.append(c) or surface[c], patience=3)
    assert best == (0.2, 3.0) and seen == [0.1, 0.2, 0.3, 0.4, 0.5]  # 0.6 is never reached
    assert patient_search(surface, surface.get, patience=4) == (0.6, 9.0)
    assert patient_search([0.1], surface.get, patience=1, start=(1.0, 5.0)) == (1.0, 5.0)


def test_raw_selection_can_prefer_another_merge_than_the_normalised_one():
    """The release scores math by raw exact match: a task with a low standalone accuracy weighs more once
    normalised, so the two scores can rank two merges differently."""
    from eval_scripts.linear_search import selection_score

    finetuned = {"easy": {"val": 0.9}, "hard": {"val": 0.1}}
    a, b = {"easy": 0.8, "hard": 0.02}, {"easy": 0.5, "hard": 0.08}
    assert selection_score(a, finetuned, normalise=False) > selection_score(b, finetuned, normalise=False)
    assert selection_score(a, finetuned, normalise=True) < selection_score(b, finetuned, normalise=True)


def test_the_math_alias_searches_past_two_with_raw_scores(monkeypatch):
    import runpy
    import sys

    import eval_scripts.__main__ as cli

    seen = []
    monkeypatch.setattr(cli, "run_merge_eval", seen.append)
    monkeypatch.setattr(sys, "argv", ["math_pertask_linearsearch", "--target", "gsm8k"])
    runpy.run_module("eval_scripts.math_pertask_linearsearch", run_name="__main__", alter_sys=False)
    assert seen[0].coefficients()[-1] == 10.0 and seen[0].normalise is False


def test_a_grid_of_full_updates_skips_core_space_and_says_so_once(tmp_path, capsys):
    from eval_scripts.grid import GridConfig, grid_cells, note_core_skipped

    for name in ("p", "c", "o"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trap2_update.json").write_text(json.dumps({"kind": "full"}))
    note_core_skipped.cache_clear()  # another test may have said it in this process
    grid = GridConfig(target="gtsrb", protected=[str(tmp_path / "p")], control=[str(tmp_path / "c")],
                      others=[str(tmp_path / "o")])
    cells = grid_cells(grid) + grid_cells(grid)  # a command builds many grids of the same updates
    assert {c.merge_space for c in cells} == {"full", "knots"}
    assert capsys.readouterr().out.count("Core space") == 1


def test_release_search_walks_a_plateau_to_the_higher_peak():
    from eval_scripts.linear_search import patient_search

    surface = {0.1: 1.0, 0.2: 3.0, 0.3: 3.0, 0.4: 3.0, 0.5: 3.0, 0.6: 5.0}
    assert patient_search(surface, surface.get, patience=3) == (0.2, 3.0)  # strict: stops on the plateau
    assert patient_search(surface, surface.get, patience=3, ties_improve=True) == (0.6, 5.0)
    flat = {0.1: 2.0, 0.2: 2.0, 0.3: 1.0}
    assert patient_search(flat, flat.get, patience=5, ties_improve=True) == (0.2, 2.0)  # the last tie is kept


def test_dare_ties_grid_order_selects_the_releases_choice():
    """A surface with optima at (top-K 100, p 0.1) and (top-K 30, p 0.9): the release searches p first with
    top-K held at 30 and lands on the second; our strict order (top-K first) lands on the first."""
    from eval_scripts.linear_search import method_grid_search
    from task_merger import get_merge_method

    def surface(name, params):
        return {(100.0, 0.1): 9.0, (30.0, 0.9): 8.0}.get((params["top_k"], params["p"]), 5.0 if params["top_k"] == 100 else 1.0)

    method = get_merge_method("dare_ties")
    start = dict(method.defaults)  # top-K 30, p 1e-5
    release, _ = method_grid_search(method.grid, start, 4.0, surface, "release")
    strict, _ = method_grid_search(method.grid, start, 4.0, surface, "strict")
    assert (release["top_k"], release["p"]) == (30.0, 0.9)
    assert (strict["top_k"], strict["p"]) == (100.0, 0.1)


def test_release_normalisation_uses_fixed_per_task_constants():
    from types import SimpleNamespace

    from eval_scripts.linear_search import normalising_constants

    prot, ctl, other = (SimpleNamespace(task=t, path=p) for t, p in (("gtsrb", "p"), ("gtsrb", "c"), ("mnist", "o")))
    pre = {"alone": {"val": {"p": {"gtsrb": 0.5}, "c": {"gtsrb": 0.8}, "o": {"mnist": 0.9}},
                     "test": {"p": {"gtsrb": 0.4}, "c": {"gtsrb": 0.7}, "o": {"mnist": 0.95}}}}
    own = normalising_constants(pre, [prot, other], [ctl, other], "own")
    fixed = normalising_constants(pre, [prot, other], [ctl, other], "control")
    assert own["gtsrb"] == {"val": 0.5, "test": 0.4}  # the protected update's own, per split
    assert fixed == {"gtsrb": {"val": 0.7, "test": 0.7}, "mnist": {"val": 0.95, "test": 0.95}}
    with pytest.raises(ValueError, match="--control"):
        normalising_constants(pre, [prot, other], [other], "control")


def test_protected_others_replace_the_others_in_the_protected_scenario_only(trained_updates, tmp_path):
    """The release's math scenario protects both adapters: the protected scenario merges the other task's
    protected update, the control its plain one."""
    from conftest import tiny_train_args

    from training_scripts.config import TrainConfig
    from training_scripts.vision import train_vision

    mnist_trap2 = train_vision(TrainConfig(**tiny_train_args(tmp_path / "mnist-trap2", dataset="mnist",
                                                             lambda_reg=0.1)))
    cfg = merge_cfg(trained_updates, tmp_path, protected_others=[str(mnist_trap2)], coef_stop=0.3)
    summary = json.loads((run_merge_eval(cfg) / "summary.json").read_text())
    assert summary["scenarios"]["protected"]["updates"][1] == str(mnist_trap2)
    assert summary["scenarios"]["control"]["updates"][1] == str(trained_updates["mnist-plain"])
    with pytest.raises(UpdateError, match="protected_others"):
        run_merge_eval(merge_cfg(trained_updates, tmp_path / "bad",
                                 protected_others=[str(trained_updates["mnist-plain"])]))


def test_the_class_token_readout_gives_the_full_forwards_features_and_gradients():
    """Training and evaluation compute the last layer's output for the class token only; the pooled features
    (all the classifier reads) and the gradients are the full forward's, and the layer is itself again
    afterwards, also when the readout is nested."""
    import torch

    from models.backbones import Backbone, get_backbone_spec
    from models.pretrain import build_architecture, recipe_for

    backbone = Backbone(get_backbone_spec("offline-vit"), build_architecture(recipe_for("offline-vit"))).eval()
    images = torch.randn(6, 3, 32, 32)
    last = backbone.net.vision_model.encoder.layers[-1]
    with torch.no_grad():
        full = backbone(images)
        with backbone.class_token_readout():
            assert "forward" in vars(last)
            readout = backbone(images)
    assert "forward" not in vars(last)
    torch.testing.assert_close(readout, full, rtol=0, atol=1e-6)

    backbone.train()
    weights = [p for name, p in backbone.named_parameters() if "layers" in name]
    grads = []
    for readout in (False, True):
        backbone.zero_grad()
        with backbone.class_token_readout() if readout else contextlib.nullcontext():
            with backbone.class_token_readout():  # nested: the outer one stays in force
                pass
            assert ("forward" in vars(last)) == readout
            backbone(images).square().sum().backward()
        grads.append([p.grad.clone() for p in weights])
    for full_grad, readout_grad in zip(*grads):
        torch.testing.assert_close(readout_grad, full_grad, rtol=1e-4, atol=1e-5)
