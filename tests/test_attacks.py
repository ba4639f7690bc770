"""The attackers beyond the paper's five: RegMean, Chain of Merges, and PEFT's own adapter merging."""
import csv
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eval_scripts.evaluators import evaluator_for
from eval_scripts.linear_search import MergeConfig, make_merger, run_merge_eval
from eval_scripts.merge_statistics import forward_order
from eval_scripts.peft_merge import PeftMerger, peft_model
from models.updates import UpdateError, load_update
from task_merger import MERGE_METHODS, TaskMerger, regmean


def _spd(n, seed):
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / (3 * n)


def test_regmean_of_one_task_returns_it_and_identity_grams_give_the_mean():
    deltas = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torch.testing.assert_close(regmean(deltas[:1], [_spd(4, 0)], alpha=0.7), deltas[0], atol=1e-6, rtol=0)
    eye = [torch.eye(4, dtype=torch.float64)] * 3
    torch.testing.assert_close(regmean(deltas, eye), torch.stack(deltas).mean(0), atol=1e-6, rtol=0)
    # alpha = 0 keeps only the diagonals: a per-input-feature weighted mean
    grams = [_spd(4, i + 1) for i in range(3)]
    diag = torch.stack([torch.diagonal(g) for g in grams])  # tasks × inputs
    want = (torch.stack(deltas).double() * diag[:, None, :]).sum(0) / diag.sum(0)
    torch.testing.assert_close(regmean(deltas, grams, alpha=0.0).double(), want, atol=1e-6, rtol=0)


def test_regmean_solves_the_least_squares_problem_it_claims():
    deltas = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    grams = [_spd(4, 10 + i) for i in range(2)]
    merged = regmean(deltas, grams, alpha=1.0)

    def objective(w):
        return sum(torch.trace((w - d) @ g @ (w - d).T) for d, g in zip(deltas, grams))

    for k in range(5):  # any perturbation raises Σ_i ‖X_i (W − W_i)ᵀ‖²
        bump = 1e-3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
        assert objective(merged + bump) > objective(merged)


def test_a_data_dependent_method_refuses_other_spaces_and_missing_statistics(trained_updates):
    updates = [load_update(trained_updates[k]) for k in ("gtsrb-plain", "mnist-plain")]
    with pytest.raises(UpdateError, match="full space"):
        TaskMerger(updates, "core", grams=lambda p: {}).merge("regmean")
    with pytest.raises(ValueError, match="Gram"):
        TaskMerger(updates, "full").merge("regmean")


def _evaluator(trained_updates, keys=("gtsrb-plain", "mnist-plain")):
    updates = [load_update(trained_updates[k]) for k in keys]
    cfg = MergeConfig(target="gtsrb", statistics_examples=32, progress=False)
    return updates, cfg, evaluator_for(updates, torch.device("cpu"), cfg)


def test_regmean_statistics_are_each_tasks_inputs_through_its_own_update(trained_updates):
    updates, cfg, ev = _evaluator(trained_updates)
    merger = make_merger(ev, updates, MergeConfig(**{**vars(cfg), "merge_method": "regmean"}))
    grams = merger.grams({"alpha": 0.9})
    names = updates[0].names()
    assert set(grams) == set(names) and all(len(g) == 2 for g in grams.values())
    # recomputed by hand for the mnist update's first layer
    name = forward_order(ev, names, "mnist")[0]
    ev.apply({n: updates[1].delta(n) for n in updates[1].names()}, 1.0)
    rows = []
    module = ev.net.get_submodule(name.removesuffix(".weight"))
    hook = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        ev.feed("mnist", 32)
    hook.remove()
    x = torch.cat(rows)
    torch.testing.assert_close(grams[name][1], x.T @ x / len(x))
    merged = merger.merge("regmean", alpha=0.9)
    torch.testing.assert_close(merged[name], regmean([u.delta(name) for u in updates], grams[name], 0.9))


def test_chain_of_merges_first_layer_equals_regmean_and_later_layers_see_the_merged_model(trained_updates):
    updates, cfg, ev = _evaluator(trained_updates)
    inputs = make_merger(ev, updates, MergeConfig(**{**vars(cfg), "merge_method": "regmean"})).grams({"alpha": 0.9})
    chain = make_merger(ev, updates, MergeConfig(**{**vars(cfg), "merge_method": "chain_of_merges"}))
    chained = chain.grams({"alpha": 0.9})
    order = forward_order(ev, updates[0].names(), "gtsrb")
    assert len(order) == len(updates[0].names())
    # layers of the first block read the base's patch embeddings alone: both statistics agree
    first = order[0]
    for a, b in zip(inputs[first], chained[first]):
        torch.testing.assert_close(a, b)
    # the last layer reads activations of the partly merged model: neither task's own model gives them
    last = order[-1]
    assert not torch.allclose(inputs[last][0], chained[last][0])
    merged = chain.merge("chain_of_merges", alpha=0.9)
    assert all(torch.isfinite(t).all() for t in merged.values())


@pytest.mark.parametrize("combination", ["linear", "cat", "svd", "ties", "dare_linear", "magnitude_prune_svd"])
def test_a_peft_merge_through_our_evaluator_equals_running_peft_merged_model(trained_updates, combination):
    updates, cfg, ev = _evaluator(trained_updates)
    method = f"peft_{combination}"
    merged = PeftMerger(updates, ev.net, seed=3).merge(method)
    params = {"density": 0.3} if MERGE_METHODS[method].defaults else {}
    model = peft_model(ev.net, updates)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.add_weighted_adapter(["task0", "task1"], [1.0, 1.0], "m", combination_type=combination, **params)
    model.set_adapter("m")
    x = next(iter(ev.tasks["gtsrb"].task.batches("test", 8)))[0]
    head = ev.tasks["gtsrb"].classifier
    with torch.no_grad():
        ev.apply(merged, 1.0)
        ours = head(x)
        ev.apply(None)
        head.backbone.net = model  # the classifier on PEFT's model
        try:
            theirs = head(x)
        finally:
            head.backbone.net = ev.net
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_peft_linear_has_cross_terms_and_cat_is_task_arithmetic(trained_updates):
    updates, _, ev = _evaluator(trained_updates)
    name = updates[0].names()[0]
    cat = PeftMerger(updates, ev.net).merge("peft_cat")[name]
    torch.testing.assert_close(cat, updates[0].delta(name) + updates[1].delta(name), atol=1e-5, rtol=1e-5)
    f0, f1 = updates[0].lora[name], updates[1].lora[name]
    cross = (f0.B + f1.B) @ (f0.scaling * f0.A + f1.scaling * f1.A)  # √1·√1: every B_i·A_j
    torch.testing.assert_close(PeftMerger(updates, ev.net).merge("peft_linear")[name], cross, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination", ["linear", "svd", "ties"])
def test_peft_merges_are_homogeneous_in_the_weights_so_c_may_scale_them(trained_updates, combination):
    updates, _, ev = _evaluator(trained_updates)
    method = f"peft_{combination}"
    at_one = PeftMerger(updates, ev.net).merge(method)
    at_c = PeftMerger(updates, ev.net, task_coefficients=[2.5, 2.5]).merge(method)
    for name in at_one:
        torch.testing.assert_close(at_c[name], 2.5 * at_one[name], atol=1e-5, rtol=1e-4)


def test_peft_merging_refuses_full_updates_and_other_spaces(trained_updates, tmp_path):
    from conftest import tiny_train_args
    from training_scripts.config import TrainConfig
    from training_scripts.vision import train_vision

    full = load_update(train_vision(TrainConfig(**tiny_train_args(tmp_path / "full", peft="full", max_steps=2))))
    with pytest.raises(UpdateError, match="LoRA adapters only"):
        PeftMerger([full], torch.nn.Linear(2, 2))
    updates, cfg, ev = _evaluator(trained_updates)
    with pytest.raises(ValueError, match="merge_space full"):
        make_merger(ev, updates, MergeConfig(**{**vars(cfg), "merge_method": "peft_ties", "merge_space": "core"}))


@pytest.mark.parametrize("method", ["regmean", "chain_of_merges", "peft_dare_ties"])
def test_new_attackers_run_the_whole_protocol(trained_updates, tmp_path, method):
    cfg = MergeConfig(target="gtsrb", protected=[str(trained_updates["gtsrb-trap2"])],
                      control=[str(trained_updates["gtsrb-plain"])], others=[str(trained_updates["mnist-plain"])],
                      merge_method=method, coef_start=0.5, coef_stop=1.5, coef_step=0.5, patience=2, adaptive=True,
                      statistics_examples=16, output_dir=str(tmp_path), progress=False)
    out = run_merge_eval(cfg)
    summary = json.loads((out / "summary.json").read_text())
    for res in summary["scenarios"].values():
        assert set(res["test"]) == {"gtsrb", "mnist"} and "adaptive" in res
        grid = next(iter(MERGE_METHODS[method].grid))
        assert grid in res["params"]
    points = [json.loads(l) for l in (out / "points.jsonl").read_text().splitlines()]
    assert any(p["phase"].startswith("grid:") for p in points)


def test_recovery_fine_tunes_each_start_and_resumes(trained_updates, tmp_path):
    from eval_scripts.recovery import RecoveryConfig, run_recovery

    protected = tmp_path / "gtsrb-trap2"  # a copy: retrained in place below
    shutil.copytree(trained_updates["gtsrb-trap2"], protected)
    cfg = RecoveryConfig(target="gtsrb", protected=[str(protected)],
                         control=[str(trained_updates["gtsrb-plain"])], others=[str(trained_updates["mnist-plain"])],
                         coef_start=0.5, coef_stop=1.0, coef_step=0.5, patience=1, method_grid=False,
                         shots=[4, 16], recovery_seeds=[0, 1], recovery_steps=6, output_dir=str(tmp_path / "cell"),
                         progress=False)
    out = run_recovery(cfg)
    rows = list(csv.DictReader(open(out)))
    assert {(r["start"], r["k"]) for r in rows} == {(s, k) for s in ("protected", "control", "zero-shot")
                                                    for k in ("4", "16")}
    records = [json.loads(l) for l in (tmp_path / "cell" / "recovery.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(0 <= r["recovered_test"] <= 1 for r in records)
    # 16 examples move the model: the fine-tune trains (test accuracy changes from the merged model's)
    assert any(r["recovered_test"] != r["merged_test"] for r in records if r["k"] == 16)
    assert (tmp_path / "cell" / "recovery.png").stat().st_size > 0
    # the cell's summary records its merge settings only, as the grid's cells do: no recovery option
    recorded = json.loads((tmp_path / "cell" / "summary.json").read_text())["config"]
    assert "shots" not in recorded and recorded["coef_stop"] == 1.0 and recorded["output_dir"] == str(tmp_path / "cell")
    import eval_scripts.recovery as rec

    original = rec.fine_tune
    rec.fine_tune = lambda *a, **k: pytest.fail("a finished recovery study trained again")
    try:
        run_recovery(cfg)
        # the protected update retrained in its folder: its starts are studied again, the others' are not
        weights = load_file(protected / "adapter_model.safetensors")
        save_file({n: t * 0.5 if "lora_B" in n else t for n, t in weights.items()}, protected / "adapter_model.safetensors")
        trained = []
        rec.fine_tune = lambda *a, **k: trained.append(a[4]) or 0.5
        run_recovery(cfg)
        assert sorted(trained) == [4, 4, 16, 16]
        # the table reads this study's records only, not the superseded update's beside them in the log
        rows = list(csv.DictReader(open(tmp_path / "cell" / "recovery.csv")))
        assert {(r["recovered_mean"], r["seeds"]) for r in rows if r["start"] == "protected"} == {("50.0", "2")}
    finally:
        rec.fine_tune = original


def test_recovery_is_reproducible_for_a_seed(trained_updates):
    from eval_scripts.recovery import RecoveryConfig, fine_tune

    updates, _, ev = _evaluator(trained_updates, ("gtsrb-plain",))
    cfg = RecoveryConfig(target="gtsrb", recovery_steps=4)
    target = ev.tasks["gtsrb"]
    a, b = (fine_tune(target.classifier, target.task, updates[0], cfg, 8, 5, torch.device("cpu")) for _ in range(2))
    assert a == b


def test_the_attacks_command_runs_every_stage_and_reports_each_attack(tmp_path, monkeypatch):
    from conftest import TINY_BASE, TINY_SPLITS
    from eval_scripts.attacks import AttacksConfig, attacks
    from eval_scripts.reproduce import merge_root

    cfg = AttacksConfig(tasks=["gtsrb", "mnist"], runs_root=str(tmp_path / "runs"), jobs=1, lambda_reg=0.1,
                        base_options=dict(TINY_BASE), split_sizes=dict(TINY_SPLITS), max_steps=6, eval_freq=3,
                        warmup_steps=2, batch_size=16, lr=3e-3, head_shots=4, progress=False, val_limit=32,
                        attack_methods=["peft_cat", "regmean"], statistics_examples=8, shots=[4],
                        recovery_seeds=[0], recovery_steps=3)
    out = attacks(cfg)
    report = json.loads((out.parent / "attacks.json").read_text())
    assert [c["claim"].split(":")[0] for c in report["claims"]] == [
        "all-task merge, peft_cat/full", "all-task merge, regmean/full",
        "two-task merge with-mnist, peft_cat/full", "two-task merge with-mnist, regmean/full"]
    summary = json.loads((merge_root(cfg, 420, "all-tasks") / "regmean-full" / "summary.json").read_text())
    assert report["claims"][1]["protected"]["mean"] == pytest.approx(
        100 * summary["scenarios"]["protected"]["test"]["gtsrb"])
    assert {r["start"] for r in report["recovery"]} == {"protected", "control", "zero-shot"}
    text = out.read_text()
    assert "| peft_cat/full |" in text and "Few-shot recovery" in text
    assert "Few-shot recovery" in (out.parent / "tables.md").read_text()
    assert not (out.parent / "standalone.json").exists()  # the runs trained, command 1's table left to it
    from models.updates import METADATA_FILE
    from training_scripts.suite import run_dir
    trained = {(task, protected) for task in ("gtsrb", "mnist") for protected in (False, True)
               if (run_dir(cfg, task, protected, 420) / METADATA_FILE).is_file()}
    assert trained == {("gtsrb", False), ("gtsrb", True), ("mnist", False)}  # no Trap² run the merges never read

    # --report_only rebuilds the report from disk, merging and training nothing
    import eval_scripts.attacks as att

    def refuse(*args, **kwargs):
        raise AssertionError("--report_only computed something")

    for name in ("train_suite_runs", "run_cells", "run_recovery"):
        monkeypatch.setattr(att, name, refuse)
    out.unlink()
    assert attacks(dataclasses.replace(cfg, report_only=True)).read_text() == text

    # --claims_split val: the same cells judged on validation, for choosing; no recovery, no test number printed
    reports = []
    monkeypatch.setattr(att, "train_suite_runs", lambda run_cfg, report, protected_tasks: reports.append(report))
    monkeypatch.setattr(att, "run_cells", lambda cells, jobs: None)
    judged_file = attacks(dataclasses.replace(cfg, claims_split="val"))
    judged = json.loads(judged_file.read_text())
    assert reports == [False] and judged_file.name == "attacks-val.json" and judged["split"] == "val"
    assert [c["claim"] for c in judged["claims"]] == [c["claim"] for c in report["claims"]]
    assert judged["claims"][1]["protected"]["mean"] == pytest.approx(
        100 * summary["scenarios"]["protected"]["val"]["gtsrb"])
    assert out.read_text() == text  # the test report is left as it was
