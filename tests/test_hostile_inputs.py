"""Hostile and broken inputs (issue 17): each case must end in a one-line error that names the problem,
without running code from a file, changing a cache, or reporting a result."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_BASE
from models.storage import FolderBusy, FolderLock, append_jsonl, read_jsonl
from models.updates import METADATA_FILE, PEFT_CONFIG, PEFT_WEIGHTS, UpdateError, load_update

REPO = Path(__file__).resolve().parent.parent
MARKER = "trap2-pwned"


class Payload:
    """Unpickling this writes a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _json(folder: Path, name: str, **changes) -> None:
    data = json.loads((folder / name).read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    (folder / name).write_text(json.dumps(data))


def _pickle_as_weights(folder: Path, marker: Path) -> None:
    torch.save({"x": Payload(marker)}, folder / PEFT_WEIGHTS)


def _pickle_beside(folder: Path, marker: Path) -> None:
    (folder / PEFT_WEIGHTS).unlink()
    torch.save({"x": Payload(marker)}, folder / "adapter_model.bin")


def _truncate(folder: Path, marker: Path) -> None:
    data = (folder / PEFT_WEIGHTS).read_bytes()
    (folder / PEFT_WEIGHTS).write_bytes(data[: len(data) // 2])


def _scale_b(factor: float):
    def change(folder: Path, marker: Path) -> None:
        tensors = load_file(str(folder / PEFT_WEIGHTS))
        save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, str(folder / PEFT_WEIGHTS))
    return change


# (case, how the released folder is altered, the one-line message expected on loading it)
LOAD_CASES = [
    ("pickle named as safetensors", _pickle_as_weights, "not a readable safetensors file"),
    ("pickle beside the adapter", _pickle_beside, "only safetensors adapters are read"),
    ("truncated safetensors", _truncate, "not a readable safetensors file"),
    ("NaN tensor", _scale_b(float("nan")), "NaN or Inf"),
    ("huge finite B", _scale_b(1e12), "exceeds"),
    ("NaN lora_alpha", lambda f, m: _json(f, PEFT_CONFIG, lora_alpha=float("nan")), "lora_alpha"),
    ("huge lora_alpha", lambda f, m: _json(f, PEFT_CONFIG, lora_alpha=1e30), "lora_alpha"),
    ("string lora_alpha", lambda f, m: _json(f, PEFT_CONFIG, lora_alpha="16"), "lora_alpha"),
    ("NaN lambda_reg", lambda f, m: _json(f, METADATA_FILE, lambda_reg=float("nan")), "lambda_reg"),
    ("negative lambda_reg", lambda f, m: _json(f, METADATA_FILE, lambda_reg=-1), "lambda_reg"),
    ("base_model not a string", lambda f, m: _json(f, METADATA_FILE, base_model=["x"]), "base_model"),
    ("config not a mapping", lambda f, m: _json(f, METADATA_FILE, config="/etc/passwd"), "config"),
    ("metadata not JSON", lambda f, m: (f / METADATA_FILE).write_text("{kind: lora"), "not valid JSON"),
    ("unknown kind", lambda f, m: _json(f, METADATA_FILE, kind="pickle"), "metadata kind"),
]


@pytest.mark.parametrize("case,alter,message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_a_corrupt_or_hostile_update_is_refused_on_loading(case, alter, message, trained_updates, tmp_path):
    folder = tmp_path / "update"
    shutil.copytree(trained_updates["gtsrb-trap2"], folder)
    marker = tmp_path / MARKER
    alter(folder, marker)
    with pytest.raises(UpdateError, match=message) as err:
        load_update(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert not marker.exists()


def _merge(protected: Path, control: Path, others: list[Path], out: Path, **extra):
    from eval_scripts.linear_search import MergeConfig, run_merge_eval

    return run_merge_eval(MergeConfig(target="gtsrb", protected=[str(protected)], control=[str(control)],
                                      others=[str(p) for p in others], coef_start=0.5, coef_stop=1.0,
                                      coef_step=0.5, patience=1, method_grid=False, val_limit=32,
                                      output_dir=str(out), progress=False, **extra))


def _bases() -> list[str]:
    root = Path(os.environ["TRAP2_DATA"]) / "bases"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# (case, metadata changes of the released (protected) update, the message expected when merging it; the
# released update is merged alone where it would otherwise first fail for differing from the user's updates)
MERGE_CASES = [
    ("base named by a path", {"base_model": "/tmp/evil-base"}, "not a known backbone"),
    ("base option pointing at a file", {"base_options": {**TINY_BASE, "pretrained": "/tmp/evil.bin"}},
     "not taken from an update"),
    ("recipe that would pretrain a new base (alone)", {"base_options": {**TINY_BASE, "steps": 10**9}},
     "may not start pretraining"),
    ("recipe that differs from the user's updates", {"base_options": {**TINY_BASE, "steps": 10**9}},
     "differ from"),
    ("unknown recipe field (alone)", {"base_options": {**TINY_BASE, "evil": 1}}, "unknown recipe fields"),
    ("split sizes in metadata", {"config": {"split_sizes": {"train": 160, "val": 64, "test": 8}}},
     "recorded data settings differ"),
    ("metadata without a config", {"config": None}, "holds no training config"),
]


@pytest.mark.parametrize("case,changes,message", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_update_metadata_never_steers_the_host(case, changes, message, trained_updates, tmp_path):
    from eval_scripts.linear_search import MergeConfig, run_merge_eval

    protected = tmp_path / "protected"
    shutil.copytree(trained_updates["gtsrb-trap2"], protected)
    _json(protected, METADATA_FILE, **changes)
    bases = _bases()
    with pytest.raises(UpdateError, match=message) as err:
        if "(alone)" in case:
            run_merge_eval(MergeConfig(target="gtsrb", protected=[str(protected)], output_dir=str(tmp_path / "sweep"),
                                       progress=False))
        else:
            _merge(protected, trained_updates["gtsrb-plain"], [trained_updates["mnist-plain"]], tmp_path / "sweep")
    assert "\n" not in str(err.value)
    assert _bases() == bases  # nothing pretrained or cached because an update asked
    assert not (tmp_path / "sweep" / "summary.json").exists()


# (case, argv of the merge command, the message expected)
OPTION_CASES = [
    ("zero coefficient step", ["--coef_step", "0"], "coef_step"),
    ("reversed coefficient range", ["--coef_start", "2", "--coef_stop", "1"], "swap"),
    ("zero validation limit", ["--val_limit", "0"], "val_limit"),
    ("NaN coefficient", ["--coef_stop", "nan"], "coef_stop"),
]


@pytest.mark.parametrize("case,argv,message", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_merge_options_are_refused_in_one_line(case, argv, message, capsys):
    from eval_scripts.__main__ import main

    with pytest.raises(SystemExit):
        main(["--target", "gtsrb"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


@pytest.mark.parametrize("text,message", [("lambda_reg: [0.1\n", "is not valid YAML"),
                                          ("- 1\n- 2\n", "must hold a mapping"),
                                          ("lambda_reg: 0.1\nevil: 1\n", "unknown options ['evil']")])
def test_a_broken_yaml_config_is_named_in_one_line(text, message, tmp_path, capsys):
    from models.options import parse_config
    from training_scripts.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(path) in last and message in last


def test_command_errors_are_one_line_without_a_traceback(tmp_path):
    """The command-line wrapper: one `error:` line and status 2; --debug shows the traceback."""
    bad = tmp_path / "update"
    bad.mkdir()
    (bad / METADATA_FILE).write_text('{"kind": "lora", "task": "gtsrb", "base_model": "offline-vit", '
                                     '"base_fingerprint": "0", "lambda_reg": NaN}')
    cmd = [sys.executable, "-m", "eval_scripts", "--target", "gtsrb", "--protected", str(bad)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: {bad / METADATA_FILE}: lambda_reg is nan, expected a finite number >= 0; the metadata is corrupt"]
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=REPO)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_second_writer_of_a_folder_fails_at_once_naming_the_holder(tmp_path):
    lock = FolderLock(tmp_path / "run")
    with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
        FolderLock(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()  # a finished folder carries no lock file
    FolderLock(tmp_path / "run").release()  # free again


def test_overwrite_refuses_a_live_run_and_keeps_its_files(tmp_path):
    from conftest import tiny_train_args
    from training_scripts.config import TrainConfig
    from training_scripts.runs import open_run_dir

    out = tmp_path / "run"
    live = FolderLock(out)  # another process training here
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = TrainConfig(**tiny_train_args(out, overwrite=True))
    with pytest.raises(FolderBusy):
        open_run_dir(cfg, out)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    live.release()


def test_a_second_sweep_in_the_same_folder_is_refused(trained_updates, tmp_path):
    live = FolderLock(tmp_path / "sweep")
    with pytest.raises(FolderBusy):
        _merge(trained_updates["gtsrb-trap2"], trained_updates["gtsrb-plain"], [trained_updates["mnist-plain"]],
               tmp_path / "sweep")
    live.release()


def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path):
    log = tmp_path / "points.jsonl"
    append_jsonl(log, {"key": "a", "score": 1})
    with open(log, "a") as fh:
        fh.write('{"key": "b", "sco')  # killed mid-write
    assert [r["key"] for r in read_jsonl(log)] == ["a"]
    append_jsonl(log, {"key": "c", "score": 3})
    assert log.read_text().splitlines() == ['{"key": "a", "score": 1}', '{"key": "c", "score": 3}']


def test_a_truncated_checkpoint_says_how_to_recover(tmp_path):
    from conftest import tiny_train_args
    from training_scripts.config import TrainConfig
    from training_scripts.runs import SETTINGS_FILE
    from training_scripts.vision import train_vision

    cfg = TrainConfig(**tiny_train_args(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / SETTINGS_FILE).write_text(json.dumps({"config": __import__("dataclasses").asdict(cfg)}))
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="delete it to restart"):
        train_vision(cfg)


def test_points_of_other_evaluation_data_are_not_reused(trained_updates, tmp_path):
    """A sweep folder rerun after the evaluation data changed (here the heads' shots) evaluates afresh."""
    copies = {}
    for name, path in trained_updates.items():
        copies[name] = tmp_path / name
        shutil.copytree(path, copies[name])
    sweep = tmp_path / "sweep"
    _merge(copies["gtsrb-trap2"], copies["gtsrb-plain"], [copies["mnist-plain"]], sweep)
    first = len(read_jsonl(sweep / "points.jsonl"))
    _merge(copies["gtsrb-trap2"], copies["gtsrb-plain"], [copies["mnist-plain"]], sweep)
    assert len(read_jsonl(sweep / "points.jsonl")) == first  # same data: every point reused
    for folder in copies.values():
        _json(folder, METADATA_FILE, config={"head_shots": 2})
    _merge(copies["gtsrb-trap2"], copies["gtsrb-plain"], [copies["mnist-plain"]], sweep)
    assert len(read_jsonl(sweep / "points.jsonl")) == 2 * first


def test_a_math_update_cannot_start_pretraining(tmp_path):
    from eval_scripts.evaluators import MathEvaluator
    from models.updates import ReleasedUpdate

    meta = {"kind": "lora", "task": "offline-gsm8k", "suite": "math", "base_model": "offline-llama",
            "base_fingerprint": "0", "base_options": {"steps": 10**9}, "config": {}}
    bases = _bases()
    with pytest.raises(UpdateError, match="may not start pretraining"):
        MathEvaluator([ReleasedUpdate(tmp_path, "lora", meta)], torch.device("cpu"))
    assert _bases() == bases
