import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import tiny_train_args
from models.updates import METADATA_FILE, PEFT_WEIGHTS, UpdateError, load_update
from models.options import parse_config
from training_scripts.config import TrainConfig
from training_scripts.vision import train_vision


def test_trained_update_is_a_peft_adapter_and_round_trips(trained_updates):
    from peft import PeftModel

    from models.backbones import load_base

    path = trained_updates["gtsrb-trap2"]
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["protected"] and meta["kind"] == "lora" and meta["task"] == "gtsrb"
    card = (path / "README.md").read_text()  # the model card: front matter the Hub reads
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == meta["base_model"]
    assert {"trap2", "unmergeable", "lora", "gtsrb"} <= set(front["tags"]) and "λ = 0.1" in card
    assert set(meta["test_by_scale"]) == {"0", "0.125", "0.5", "1"}
    from safetensors import safe_open

    with safe_open(str(path / PEFT_WEIGHTS), "pt") as fh:  # the header transformers and people read
        header = fh.metadata()
    assert header["format"] == "pt" and header["base_fingerprint"] == meta["base_fingerprint"]
    assert header["trap2_task"] == "gtsrb" and float(header["trap2_lambda_reg"]) == 0.1
    base = load_base(meta["base_model"], meta["base_options"])
    assert base.fingerprint == meta["base_fingerprint"]
    x = torch.randn(4, 3, 32, 32)
    peft_model = PeftModel.from_pretrained(load_base(meta["base_model"], meta["base_options"]).backbone.net, path)
    peft_model.eval()
    expected = peft_model(pixel_values=x).image_embeds
    # our loader gives ΔW per base weight; base + ΔW must match PEFT's own forward
    update = load_update(path)
    assert all(name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"))
               for name in update.names())
    state = dict(base.backbone.net.state_dict())
    update.check_base(base.fingerprint, state)
    with torch.no_grad():
        for name in update.names():
            state[name] = state[name] + update.delta(name)
    base.backbone.net.load_state_dict(state)
    assert torch.allclose(base.backbone.net(pixel_values=x).image_embeds, expected, atol=1e-5)


def test_same_seed_same_update_bit_for_bit(tmp_path):
    a = train_vision(TrainConfig(**tiny_train_args(tmp_path / "a", lambda_reg=0.1)))
    b = train_vision(TrainConfig(**tiny_train_args(tmp_path / "b", lambda_reg=0.1)))
    c = train_vision(TrainConfig(**tiny_train_args(tmp_path / "c", lambda_reg=0.1, seed=7)))
    ta, tb, tc = (load_file(str(p / PEFT_WEIGHTS)) for p in (a, b, c))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_full_update_trains_saves_and_loads(tmp_path):
    path = train_vision(TrainConfig(**tiny_train_args(tmp_path / "full", peft="full", lambda_reg=0.1, lr=1e-4)))
    update = load_update(path)
    assert update.kind == "full"
    assert any(n.endswith("bias") for n in update.names())  # every trained tensor, not just matrices
    assert any(update.delta(n).abs().max() > 0 for n in update.names())


def _released_norm(path) -> float:
    """‖ΔW‖_F of a release, from its own tensors (LoRA: B @ A formed explicitly)."""
    update = load_update(path)
    return sum(float(update.delta(n).double().pow(2).sum()) for n in update.names()) ** 0.5


def test_update_norm_and_its_bound_are_exact_and_keep_the_direction():
    from peft import LoraConfig, get_peft_model
    from models.updates import ScaledUpdate

    torch.manual_seed(0)
    net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)),
                         LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()
    update = ScaledUpdate.lora(net)

    def layer_deltas():  # PEFT's own ΔW per adapted layer
        return [m.get_delta_weight("default").detach().clone() for m in net.modules() if hasattr(m, "get_delta_weight")]

    deltas = layer_deltas()
    norm = sum(float(d.double().pow(2).sum()) for d in deltas) ** 0.5
    assert len(deltas) == 2 and update.norm() == pytest.approx(norm, rel=1e-6)
    before = {n: p.detach().clone() for n, p in update.params.items()}
    assert update.bound_norm_(2 * norm) == pytest.approx(norm, rel=1e-6)  # inside the ball: untouched
    assert all(torch.equal(before[n], p) for n, p in update.params.items())
    update.bound_norm_(norm / 3)
    after = layer_deltas()
    assert update.norm() == pytest.approx(norm / 3, rel=1e-6)
    for d, a in zip(deltas, after):  # every layer shrinks by the same factor: one direction
        assert torch.allclose(a, d / 3, atol=1e-6)


@pytest.mark.parametrize("peft", ["lora", "full"])
def test_a_bounded_run_releases_an_update_on_its_norm_bound(tmp_path, peft):
    lr = 3e-3 if peft == "lora" else 1e-3
    free = _released_norm(train_vision(TrainConfig(**tiny_train_args(tmp_path / "free", peft=peft, lr=lr))))
    bound = free / 2
    path = train_vision(TrainConfig(**tiny_train_args(tmp_path / "bound", peft=peft, lr=lr, max_update_norm=bound)))
    assert _released_norm(path) == pytest.approx(bound, rel=1e-4)
    assert json.loads((path / METADATA_FILE).read_text())["config"]["max_update_norm"] == bound


def test_convnext_lora_targets_mlp(tmp_path):
    path = train_vision(TrainConfig(**tiny_train_args(tmp_path / "cnx", model="offline-convnext")))
    names = load_update(path).names()
    assert names and all(n.endswith(("fc1.weight", "fc2.weight")) for n in names)


def test_interrupted_run_resumes_to_identical_update(tmp_path, monkeypatch):
    import training_scripts.loop as loop

    reference = train_vision(TrainConfig(**tiny_train_args(tmp_path / "ref", lambda_reg=0.1)))
    original = loop._save_checkpoint

    def crash_after_first_checkpoint(path, state):
        original(path, state)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(loop, "_save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_vision(TrainConfig(**tiny_train_args(tmp_path / "crash", lambda_reg=0.1)))
    assert (tmp_path / "crash" / loop.CHECKPOINT).exists()
    monkeypatch.setattr(loop, "_save_checkpoint", original)
    resumed = train_vision(TrainConfig(**tiny_train_args(tmp_path / "crash", lambda_reg=0.1)))
    ta, tb = load_file(str(reference / PEFT_WEIGHTS)), load_file(str(resumed / PEFT_WEIGHTS))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not (resumed / loop.CHECKPOINT).exists()
    events = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" for e in events)


def test_untrusted_updates_are_rejected_clearly(trained_updates, tmp_path):
    import shutil

    src = trained_updates["gtsrb-plain"]
    bad = tmp_path / "nan"
    shutil.copytree(src, bad)
    tensors = load_file(str(bad / PEFT_WEIGHTS))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / PEFT_WEIGHTS))
    with pytest.raises(UpdateError, match="NaN"):
        load_update(bad)

    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    (pickled / PEFT_WEIGHTS).unlink()
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(UpdateError, match="only safetensors"):
        load_update(pickled)

    with pytest.raises(UpdateError, match="not a trap2 update"):
        load_update(tmp_path)

    update = load_update(src)
    with pytest.raises(UpdateError, match="fingerprint"):
        update.check_base("0000", {})


def test_config_yaml_and_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: dtd\nlambda_reg: 0.3\nlr: 0.001\nfixed_scales: [0.5, 1.5]\n")
    cfg = parse_config(TrainConfig, ["--config", str(cfg_file), "--lambda_reg", "0.2"], defaults={"peft": "full"})
    assert (cfg.dataset, cfg.lambda_reg, cfg.lr, cfg.peft, cfg.fixed_scales) == ("dtd", 0.2, 0.001, "full", [0.5, 1.5])
    cfg_file.write_text("dataset: dtd\noff_loss_cap: 5\n")
    assert parse_config(TrainConfig, ["--config", str(cfg_file)]).off_loss_cap == 5
    assert parse_config(TrainConfig, ["--config", str(cfg_file), "--off_loss_cap", "None"]).off_loss_cap is None
    assert parse_config(TrainConfig, ["--config", str(cfg_file), "--off_loss_cap", "2.5"]).off_loss_cap == 2.5
    cfg_file.write_text("datasett: dtd\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(cfg_file)])
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--peft", "qlora"])
    # mappings on the command line, as the README and the base errors tell users to pass them
    cfg = parse_config(TrainConfig, ["--base_options", "{steps: 30, pretext_train: 512}", "--split_sizes",
                                     "{train: 320}"])
    assert cfg.base_options == {"steps": 30, "pretext_train": 512} and cfg.split_sizes == {"train": 320}
    assert parse_config(TrainConfig, ["--base_options", "none"]).base_options is None
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--base_options", "[1, 2]"])


@pytest.mark.parametrize("argv", [["--lambda_reg", "nan"], ["--lambda_reg", "-0.1"], ["--lr", "inf"],
                                  ["--off_loss_cap", "nan"], ["--band", "nan"], ["--max_update_norm", "0"],
                                  ["--max_update_norm", "nan"], ["--max_update_norm", "2", "--use_dora", "true"]])
def test_non_finite_or_negative_settings_are_refused(argv, capsys):
    """A NaN λ passes every comparison and would train an unprotected update recorded as protected."""
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, argv)
    assert argv[0] in capsys.readouterr().err


def test_suite_runs_chosen_on_validation_print_no_test_accuracy(tmp_path, capsys):
    from training_scripts.suite import train_runs

    for report in (True, False):
        run = TrainConfig(**tiny_train_args(tmp_path / f"report-{report}", max_steps=2, eval_freq=2))
        train_runs([run], jobs=1, report=report)
        printed = capsys.readouterr().out
        assert ("test_accuracy" in printed) == report
        assert json.loads((tmp_path / f"report-{report}" / METADATA_FILE).read_text())["test_accuracy"] >= 0


def test_suite_and_merge_ranges_are_checked():
    from eval_scripts.linear_search import MergeConfig
    from training_scripts.suite import SuiteConfig

    for bad in ({"lambda_reg": float("nan")}, {"lambda_reg": 0.0}, {"jobs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SuiteConfig(**bad)
    for bad, words in (({"coef_step": 0.0}, "coef_step"), ({"coef_start": 2.0, "coef_stop": 1.0}, "swap"),
                       ({"val_limit": 0}, "val_limit"), ({"coef_stop": float("nan")}, "coef_stop")):
        with pytest.raises(ValueError, match=words):
            MergeConfig(**bad)


def test_full_scale_clip_path_runs_on_a_tiny_local_model(tmp_path):
    """The clip-vit-b32 entry loads through from_pretrained; a tiny random model saved locally stands in."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
                                  ).save_pretrained(tmp_path / "tiny-clip")
    args = tiny_train_args(tmp_path / "run", model="clip-vit-b32", lambda_reg=0.1)
    args["base_options"] = {"pretrained": str(tmp_path / "tiny-clip")}
    update = load_update(train_vision(TrainConfig(**args)))
    assert update.metadata["base_model"] == "clip-vit-b32"
    assert any("q_proj" in n for n in update.names())
    with pytest.raises(OSError, match="base_options"):
        from models.backbones import build_backbone

        build_backbone("clip-vit-b32", pretrained=str(tmp_path / "missing"))


def test_rerun_with_other_settings_refuses_instead_of_silently_skipping(trained_updates):
    path = trained_updates["gtsrb-plain"]
    same = TrainConfig(**tiny_train_args(path))
    assert train_vision(same) == path  # identical settings: the finished update is reused
    with pytest.raises(ValueError, match="lambda_reg"):
        train_vision(TrainConfig(**tiny_train_args(path, lambda_reg=0.05)))


def test_unprotected_overrides_reuse_runs_they_leave_unchanged_and_refuse_the_rest(trained_updates):
    """`unprotected` only acts through the fields it sets on a λ = 0 run: the Trap² run and a plain run it
    leaves as they were are reused; a plain run it changes is refused."""
    keep_plain = {"unprotected": {"weight_decay": 0.0}}
    assert train_vision(TrainConfig(**tiny_train_args(trained_updates["gtsrb-plain"], **keep_plain))) \
        == trained_updates["gtsrb-plain"]
    change_plain = {"unprotected": {"weight_decay": 0.1}}
    assert train_vision(TrainConfig(**tiny_train_args(trained_updates["gtsrb-trap2"], lambda_reg=0.1,
                                                      **change_plain))) == trained_updates["gtsrb-trap2"]
    with pytest.raises(ValueError, match="weight_decay"):
        train_vision(TrainConfig(**tiny_train_args(trained_updates["gtsrb-plain"], **change_plain)))


def test_schedules_warm_up_then_decay_to_zero():
    from models.schedules import SCHEDULES

    for name, f in SCHEDULES.items():
        assert f(0, 10, 100) == 0.1 and f(9, 10, 100) == 1.0, name
        assert f(10, 10, 100) == 1.0 and f(100, 10, 100) == 0.0, name
    assert SCHEDULES["linear"](55, 10, 100) == 0.5
    assert abs(SCHEDULES["cosine"](55, 10, 100) - 0.5) < 1e-9


def test_heads_of_other_split_sizes_are_built_from_their_own_training_images(tmp_path, monkeypatch):
    from conftest import TINY_BASE
    from models.classifier import prototype_head
    from models.backbones import load_base
    from models.vision import DataSettings, load_task, task_head

    monkeypatch.setenv("TRAP2_DATA", str(tmp_path))
    base = load_base("offline-vit", TINY_BASE)
    heads = []
    for train_size in (120, 160):  # the second must not reuse the head cached for the first
        data = DataSettings(split_sizes={"train": train_size, "val": 32, "test": 32}, head_shots=4)
        task = load_task(base, "gtsrb", data)
        images, labels = zip(*task.batches("train", 512))
        own = prototype_head(base.backbone, torch.cat(images), torch.cat(labels), len(task.classes), 4)
        heads.append(task_head(base, task, data))
        assert torch.equal(heads[-1], own)
    assert not torch.equal(heads[0], heads[1])


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
        self.calls.append(("upload_folder", repo_id, folder_path, tuple(allow_patterns)))
        return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_only_the_release_files_of_a_finished_run(trained_updates, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    from training_scripts.__main__ import main

    folder = tmp_path / "release"
    shutil.copytree(trained_updates["gtsrb-trap2"], folder)
    (folder / "stray.pt").write_bytes(b"not part of a release")
    hub = RecordingHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    args = tiny_train_args(folder, lambda_reg=0.1)
    argv = [item for k, v in args.items() if not isinstance(v, dict) for item in (f"--{k}", str(v))]
    argv += ["--base_options", json.dumps(args["base_options"]), "--split_sizes", json.dumps(args["split_sizes"]),
             "--push_to_hub", "me/gtsrb-trap2"]
    before = (folder / METADATA_FILE).stat().st_mtime_ns
    main(argv)  # a finished run: nothing retrains, the release is uploaded
    assert (folder / METADATA_FILE).stat().st_mtime_ns == before
    assert hub.calls[0] == ("create_repo", "me/gtsrb-trap2", True)
    _, repo, path, files = hub.calls[1]
    assert repo == "me/gtsrb-trap2" and path == str(folder)
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "trap2_update.json"}


def test_push_to_hub_refuses_a_bad_repo_id_and_a_corrupt_release(trained_updates, tmp_path):
    import shutil

    from models.hub import push_release

    with pytest.raises(ValueError, match="owner/name"):
        push_release(trained_updates["gtsrb-trap2"], "no-owner", api=RecordingHub())
    folder = tmp_path / "broken"
    shutil.copytree(trained_updates["gtsrb-trap2"], folder)
    (folder / PEFT_WEIGHTS).write_bytes(b"garbage")
    hub = RecordingHub()
    with pytest.raises(UpdateError, match="not a readable safetensors"):
        push_release(folder, "me/x", api=hub)
    assert hub.calls == []  # nothing left the machine


def test_report_to_mirrors_metrics_and_imports_nothing_unless_chosen(tmp_path, monkeypatch):
    import importlib.util
    import sys
    import types

    train_vision(TrainConfig(**tiny_train_args(tmp_path / "none", max_steps=2)))
    assert "wandb" not in sys.modules and "torch.utils.tensorboard" not in sys.modules

    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.init, self.logged = kwargs, []
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun(**kw)))
    out = train_vision(TrainConfig(**tiny_train_args(tmp_path / "wandb", lambda_reg=0.1, report_to="wandb")))
    (run,) = runs
    assert run.init["project"] == "trap2" and run.init["config"]["lambda_reg"] == 0.1
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(run.logged) == len(lines)  # every metrics.jsonl record, with its step
    assert [step for step, _ in run.logged] == [l["step"] for l in lines]
    assert any("val_metric" in values for _, values in run.logged)

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train_vision(TrainConfig(**tiny_train_args(tmp_path / "tb", report_to="tensorboard")))
    else:
        out = train_vision(TrainConfig(**tiny_train_args(tmp_path / "tb", report_to="tensorboard")))
        assert any((out / "tensorboard").iterdir())
    with pytest.raises(ValueError, match="--report_to must be none, tensorboard or wandb"):
        TrainConfig(**tiny_train_args(tmp_path / "x", report_to="mlflow"))


def test_two_vision_processes_under_torchrun_hold_identical_weights_after_every_step(tmp_path):
    from conftest import weights_of_two_processes

    first, second = weights_of_two_processes("ddp_vision_worker.py", tmp_path)
    assert len(first) == 4 and first == second
    assert len(set(first)) == 4  # the weights changed at every step
    meta = json.loads((tmp_path / "run" / METADATA_FILE).read_text())
    assert meta["processes"] == 2 and load_update(tmp_path / "run").kind == "lora"


def test_sharded_batches_split_each_step_between_processes_and_cover_the_epoch():
    from training_scripts.vision import StepBatches

    class Task:
        def size(self, split):
            return 40

        def batch(self, split, rows):
            return rows.clone(), rows.clone()

    import models.distributed as dist_mod

    def batches(world, rank, steps):
        dist_mod_world, dist_mod_rank = dist_mod.world_size, dist_mod.rank
        dist_mod.world_size, dist_mod.rank = (lambda: world), (lambda: rank)
        try:
            at = StepBatches(Task(), 4, seed=3, num_workers=0, device=torch.device("cpu"))
            return [at(s)[0].tolist() for s in range(steps)]
        finally:
            dist_mod.world_size, dist_mod.rank = dist_mod_world, dist_mod_rank

    single = batches(1, 0, 12)  # 10 batches an epoch, into the second epoch
    r0, r1 = batches(2, 0, 6), batches(2, 1, 6)
    assert [b for pair in zip(r0, r1) for b in pair] == single  # step s of 2 processes = batches 2s, 2s + 1


def test_decoy_settings_are_checked():
    from training_scripts.suite import SuiteConfig

    for bad, words in (({"lambda_reg": 0.1, "decoy_lambda": 1.0}, "go together"),
                       ({"lambda_reg": 0.1, "decoy_updates": ["runs/x"]}, "go together"),
                       ({"lambda_reg": 0.1, "shuffle_classes": 1}, "unprotected"),
                       ({"decoy_scale": [0.7, 0.3]}, "lo <= hi"), ({"decoy_scale": [0.5]}, "lo <= hi"),
                       ({"decoy_lambda": float("nan")}, "decoy_lambda"),
                       ({"lambda_reg": 0.1, "random_decoys": True}, "go together"),
                       ({"lambda_reg": 0.1, "decoy_lambda": 1.0, "random_decoys_like": "runs/y"}, "--random_decoys true"),
                       ({"lambda_reg": 0.1, "decoy_lambda": 1.0, "decoy_updates": ["runs/x"],
                         "random_decoys": True}, "give one")):
        with pytest.raises(ValueError, match=words):
            TrainConfig(**bad)
    for bad, words in (({"decoys": 2}, "go together"), ({"decoys": -1, "decoy_lambda": 1.0}, "decoys"),
                       ({"decoys": 2, "decoy_lambda": 1.0, "decoy_updates": ["runs/x"]}, "drop --decoy_updates"),
                       ({"random_decoys": True}, "go together"),
                       ({"random_decoys": True, "decoy_lambda": 1.0, "decoys": 2}, "give one"),
                       ({"random_decoys": True, "decoy_lambda": 1.0, "random_decoys_like": "runs/x"}, "drop it")):
        with pytest.raises(ValueError, match=words):
            SuiteConfig(**bad)


def test_suite_trains_label_shuffled_decoys_first_and_gives_them_to_each_trap2_run(tmp_path):
    from training_scripts.suite import SuiteConfig, suite_runs, train_runs

    args = {k: v for k, v in tiny_train_args(tmp_path, lambda_reg=0.1).items() if k not in ("output_dir", "dataset")}
    cfg = SuiteConfig(**args, runs_root=str(tmp_path), decoys=2, decoy_lambda=0.5)
    runs = suite_runs(cfg, ["gtsrb"])
    assert [r.shuffle_classes for r in runs] == [1, 2, None, None]  # the decoys first: the Trap² run reads them
    trap2 = runs[2]
    assert trap2.decoy_updates == [runs[0].output_dir, runs[1].output_dir] and trap2.decoy_lambda == 0.5
    assert runs[3].lambda_reg == 0 and runs[3].decoy_lambda == 0 and not runs[3].decoy_updates
    train_runs(runs[::-1], jobs=1, report=False)  # given in any order, the decoys are trained first
    decoys = [load_file(str(tmp_path / r.output_dir / PEFT_WEIGHTS)) for r in runs[:2]]
    plain = load_file(str(tmp_path / runs[3].output_dir / PEFT_WEIGHTS))
    assert not all(torch.equal(decoys[0][k], plain[k]) for k in plain)  # same seed, other (shuffled) classes
    assert not all(torch.equal(decoys[0][k], decoys[1][k]) for k in plain)
    meta = json.loads((tmp_path / trap2.output_dir / METADATA_FILE).read_text())
    assert meta["config"]["decoy_updates"] == trap2.decoy_updates
    steps = [json.loads(l) for l in (tmp_path / trap2.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_decoy" in e for e in steps)
    only_target = suite_runs(cfg, ["gtsrb", "mnist"], protected_tasks=["mnist"])  # e.g. an attack on mnist
    assert [(r.dataset, r.lambda_reg > 0, r.shuffle_classes) for r in only_target] == [
        ("mnist", False, 1), ("mnist", False, 2), ("mnist", True, None), ("gtsrb", False, None), ("mnist", False, None)]
    missing = TrainConfig(**tiny_train_args(tmp_path / "missing", lambda_reg=0.1, decoy_lambda=0.5,
                                            decoy_updates=[str(tmp_path / "nowhere")]))
    with pytest.raises(UpdateError, match="nowhere"):
        train_vision(missing)


def test_suite_trains_each_unprotected_run_before_the_trap2_run_whose_random_decoys_it_sizes(tmp_path):
    from training_scripts.suite import SuiteConfig, suite_runs, train_runs

    args = {k: v for k, v in tiny_train_args(tmp_path, lambda_reg=0.1).items() if k not in ("output_dir", "dataset")}
    cfg = SuiteConfig(**args, runs_root=str(tmp_path), random_decoys=True, decoy_lambda=0.5)
    trap2, plain = suite_runs(cfg, ["gtsrb"])
    assert trap2.random_decoys_like == plain.output_dir and trap2.decoy_lambda == 0.5 and not trap2.decoy_updates
    assert plain.lambda_reg == 0 and not plain.random_decoys and plain.decoy_lambda == 0
    train_runs([trap2, plain], jobs=1, report=False)  # the Trap² run first in the list: the plain one still trains first
    meta = json.loads((tmp_path / trap2.output_dir / METADATA_FILE).read_text())
    assert meta["config"]["random_decoys"] and meta["config"]["random_decoys_like"] == plain.output_dir
    steps = [json.loads(l) for l in (tmp_path / trap2.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_decoy" in e for e in steps)
    missing = TrainConfig(**tiny_train_args(tmp_path / "missing", lambda_reg=0.1, decoy_lambda=0.5, random_decoys=True,
                                            random_decoys_like=str(tmp_path / "nowhere")))
    with pytest.raises(UpdateError, match="nowhere"):
        train_vision(missing)
    unprotected = dataclasses.replace(missing, lambda_reg=0.0)  # a YAML's decoys are left to the Trap² runs
    assert unprotected.decoy_sources == []
    train_vision(unprotected)  # never reads the missing folder
    steps = [json.loads(l) for l in (tmp_path / "missing" / "metrics.jsonl").read_text().splitlines()]
    assert steps and not any("loss_decoy" in e for e in steps)


def test_a_finished_run_moved_with_its_decoy_source_is_reused_and_one_with_other_decoys_refused(tmp_path, capsys):
    plain = train_vision(TrainConfig(**tiny_train_args(tmp_path / "a" / "gtsrb-plain")))
    trap2 = TrainConfig(**tiny_train_args(tmp_path / "a" / "gtsrb-trap2", lambda_reg=0.1, decoy_lambda=0.5,
                                          random_decoys=True, random_decoys_like=str(plain)))
    train_vision(trap2)
    meta = json.loads((tmp_path / "a" / "gtsrb-trap2" / METADATA_FILE).read_text())
    assert meta["decoy_weights"] == [load_update(plain).content_hash]
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # e.g. runs moved to another --runs_root
    moved = dataclasses.replace(trap2, output_dir=str(tmp_path / "b" / "gtsrb-trap2"),
                                random_decoys_like=str(tmp_path / "b" / "gtsrb-plain"))
    weights = sorted((tmp_path / "b" / "gtsrb-trap2").glob("*.safetensors"))
    before = {w.name: w.read_bytes() for w in weights}
    capsys.readouterr()
    train_vision(moved)
    assert "already holds this finished update" in capsys.readouterr().out
    assert {w.name: w.read_bytes() for w in weights} == before
    train_vision(TrainConfig(**tiny_train_args(tmp_path / "b" / "gtsrb-plain", seed=421, overwrite=True)))
    with pytest.raises(ValueError, match="other settings.*random_decoys_like"):
        train_vision(moved)  # the folder's sizing run now holds other weights


def test_a_single_run_sizes_random_decoys_by_the_unprotected_run_where_the_unprotected_command_puts_it():
    run = TrainConfig(dataset="gtsrb", model="offline-convnext", lambda_reg=0.1, decoy_lambda=0.5, random_decoys=True)
    assert run.random_decoys_source == str(Path("runs/offline/offline-convnext/lora/gtsrb-plain"))
    assert run.decoy_sources == [run.random_decoys_source]
    unprotected = TrainConfig(dataset="gtsrb", model="offline-convnext", lambda_reg=0.0)
    assert str(unprotected.resolved_output_dir()) == run.random_decoys_source
    given = dataclasses.replace(run, random_decoys_like="elsewhere/gtsrb-plain")
    assert given.random_decoys_source == given.decoy_sources[0] == "elsewhere/gtsrb-plain"
    assert TrainConfig(dataset="gtsrb", lambda_reg=0.1).random_decoys_source is None


@pytest.mark.parametrize("entry", ["training_scripts.suite", "eval_scripts.reproduce"])
def test_suite_prints_one_command_per_run_that_parses_back_to_that_run(capsys, entry, tmp_path):
    import importlib
    import shlex

    from models.options import parse_config
    from training_scripts.config import parse_run_config
    from training_scripts.suite import SuiteConfig, suite_runs, training_phases

    argv = ["--config", "configs/offline/vit_lora.yaml", "--tasks", "gtsrb", "mnist", "--seeds", "420", "421",
            "--base_options", '{"steps": 15}', "--runs_root", str(tmp_path / "runs")]
    # reproduce takes the suite's options: printing must not start the training or the merges
    importlib.import_module(entry).main(argv + ["--print_commands", "true"])
    assert not (tmp_path / "runs").exists()
    lines = capsys.readouterr().out.strip().splitlines()
    # in training order: the YAML's random decoys make each Trap² run wait for the unprotected run that sizes them
    first, rest = training_phases(suite_runs(parse_config(SuiteConfig, argv), ["gtsrb", "mnist"]))
    assert all(not run.protected for run in first) and all(run.protected for run in rest)
    runs = first + rest
    assert len(lines) == len(runs) == 8
    for line, run in zip(lines, runs):
        words = shlex.split(line)
        assert words[:3] == ["python", "-m", "training_scripts"]
        assert parse_run_config(TrainConfig, words[3:]) == run


@pytest.mark.parametrize("peft", ["lora", "full"])
def test_a_run_started_from_a_release_continues_from_its_update(tmp_path, peft):
    plain = train_vision(TrainConfig(**tiny_train_args(tmp_path / "plain", peft=peft)))
    start = load_update(plain)
    # a learning rate of 1e-12 leaves the update where it started: the saved one must be the release's
    still = train_vision(TrainConfig(**tiny_train_args(tmp_path / "still", peft=peft, lambda_reg=0.1, lr=1e-12,
                                                       init_update=str(plain))))
    after = load_update(still)
    assert after.names() == start.names()
    for name in start.names():
        assert torch.allclose(after.delta(name), start.delta(name), atol=1e-6), name
    meta = json.loads((still / METADATA_FILE).read_text())
    assert meta["init_weights"] == start.content_hash and meta["config"]["init_update"] == str(plain)
    fresh = load_update(train_vision(TrainConfig(**tiny_train_args(tmp_path / "fresh", peft=peft, lambda_reg=0.1,
                                                                   lr=1e-12))))
    assert max(float(fresh.delta(n).abs().max()) for n in fresh.names()) < 1e-6  # without it: ΔW = 0


def test_a_run_refuses_to_start_from_an_update_of_another_task_kind_or_rank(tmp_path):
    plain = train_vision(TrainConfig(**tiny_train_args(tmp_path / "plain")))
    with pytest.raises(ValueError, match="gtsrb update; this run trains mnist"):
        train_vision(TrainConfig(**tiny_train_args(tmp_path / "a", dataset="mnist", init_update=str(plain))))
    with pytest.raises(UpdateError, match="lora update; this run trains a full one"):
        train_vision(TrainConfig(**tiny_train_args(tmp_path / "b", peft="full", init_update=str(plain))))
    with pytest.raises(UpdateError, match="rank 16 .*this run rank 4.*--lora_rank"):
        train_vision(TrainConfig(**tiny_train_args(tmp_path / "c", lora_rank=4, lora_alpha=4, init_update=str(plain))))
    with pytest.raises(UpdateError, match="--lora_targets"):
        train_vision(TrainConfig(**tiny_train_args(tmp_path / "d", lora_targets=["fc1"], init_update=str(plain))))


def test_protect_plain_starts_each_trap2_run_from_its_own_tasks_plain_run_which_trains_first(tmp_path):
    from training_scripts.suite import SuiteConfig, suite_runs, training_phases

    cfg = SuiteConfig(**{**tiny_train_args(tmp_path / "unused", lambda_reg=0.1), "output_dir": None},
                      runs_root=str(tmp_path), protect_plain=True, seeds=[420, 421])
    runs = suite_runs(cfg, ["gtsrb", "mnist"])
    protected = [r for r in runs if r.protected]
    plain = {r.output_dir for r in runs if not r.protected}
    assert len(protected) == 4 and {r.init_update for r in protected} == plain
    assert all(Path(r.init_update).name == Path(r.output_dir).name.replace("trap2", "plain") for r in protected)
    first, rest = training_phases(runs)
    assert {r.output_dir for r in first} == plain and rest == protected
    with pytest.raises(ValueError, match="--protect_plain"):
        SuiteConfig(lambda_reg=0.1, init_update="runs/x/gtsrb-plain")
