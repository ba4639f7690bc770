"""Bits that do not depend on the machine's thread count or on how many runs train at once, and
results that say what produced them."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_BASE, TINY_SPLITS
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent

PRETRAIN = """
import sys, torch
from safetensors.torch import save_file
from models.pretrain import pretrain, recipe_for
print(torch.get_num_threads())
net = pretrain(recipe_for("offline-vit", **{tiny}), progress=False)
save_file({{k: v.contiguous() for k, v in net.state_dict().items()}}, sys.argv[1])
"""


def test_base_pretraining_gives_the_same_bits_under_any_thread_count(tmp_path):
    outputs, threads = [], []
    for n in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        out = tmp_path / f"base-{n}.safetensors"
        done = subprocess.run([sys.executable, "-c", PRETRAIN.format(tiny=TINY_BASE), str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        threads.append(done.stdout.split()[0])
        outputs.append(load_file(str(out)))
    assert threads == ["1", "2"]  # the environments really differed
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def _tiny_suite(runs_root, jobs):
    from training_scripts.suite import SuiteConfig

    return SuiteConfig(tasks=["gtsrb", "mnist"], runs_root=str(runs_root), results=str(runs_root / "standalone"),
                       jobs=jobs, lambda_reg=0.1, base_options=dict(TINY_BASE), split_sizes=dict(TINY_SPLITS),
                       max_steps=6, eval_freq=3, warmup_steps=2, batch_size=16, lr=3e-3, head_shots=4,
                       progress=False)


def test_runs_trained_in_parallel_workers_equal_runs_trained_one_after_another(tmp_path):
    from training_scripts.suite import run_dir, train_suite

    tables = {}
    for jobs in (1, 2):
        cfg = _tiny_suite(tmp_path / f"jobs{jobs}", jobs)
        tables[jobs] = json.loads(train_suite(cfg).with_suffix(".json").read_text())
    for task in ("gtsrb", "mnist"):
        for protected in (False, True):
            a, b = (load_file(str(run_dir(_tiny_suite(tmp_path / f"jobs{j}", j), task, protected) /
                                  "adapter_model.safetensors")) for j in (1, 2))
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert tables[1]["rows"] == tables[2]["rows"]
    provenance = tables[2]["provenance"]
    assert provenance["threads"] == [1] and provenance["base_fingerprint"]
    assert {"torch", "transformers", "peft", "numpy"} <= set(provenance["versions"])
    assert provenance["code_commit"]
    from models.runtime import cpu_model
    assert provenance["cpu_model"] == cpu_model() and provenance["cpu_model"] != "unknown"


def test_a_table_never_mixes_runs_of_different_bases(trained_updates, tmp_path):
    from training_scripts.suite import SuiteConfig, write_standalone_table

    runs = tmp_path / "runs" / "offline" / "offline-vit" / "lora"
    runs.mkdir(parents=True)
    shutil.copytree(trained_updates["gtsrb-plain"], runs / "gtsrb-plain")
    shutil.copytree(trained_updates["gtsrb-trap2"], runs / "gtsrb-trap2")
    cfg = SuiteConfig(runs_root=str(tmp_path / "runs"), lambda_reg=0.1)
    md = write_standalone_table(cfg, ["gtsrb"])
    fingerprint = json.loads((runs / "gtsrb-plain" / "trap2_update.json").read_text())["base_fingerprint"]
    assert f"Base {fingerprint}" in md.read_text() and "CPU threads per run: 1" in md.read_text()
    meta_path = runs / "gtsrb-trap2" / "trap2_update.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "0123456789abcdef"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different bases"):
        write_standalone_table(cfg, ["gtsrb"])


def test_the_suite_says_in_one_line_when_its_base_is_not_the_shipped_tables(trained_updates, tmp_path, capsys,
                                                                            monkeypatch):
    from training_scripts.suite import SuiteConfig, default_results, prepare_bases, suite_runs

    monkeypatch.chdir(tmp_path)
    cfg = SuiteConfig(tasks=["gtsrb"], base_options=dict(TINY_BASE), lambda_reg=0.1)
    shipped = Path(f"{default_results(cfg)}.json")
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps({"provenance": {"base_fingerprint": "fedcba9876543210",
                                                  "cpu_model": "AuthenticAMD 25/17 AMD EPYC 9R14"}}))
    prepare_bases(cfg, suite_runs(cfg, ["gtsrb"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(lines) == 1 and "fedcba9876543210" in lines[0] and "AMD EPYC 9R14" in lines[0]


SLEEPER = """
import os, time
from pathlib import Path

def sleep_job(folder):
    (Path(folder) / f"{os.getpid()}.pid").write_text("")
    time.sleep(120)
"""

SUITE = """
import sys
from models.runtime import run_jobs
from sleeper import sleep_job
run_jobs(sleep_job, [sys.argv[1], sys.argv[1]], 2, "sleeping")
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_the_suite_also_ends_its_worker_processes(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    suite = subprocess.Popen([sys.executable, "-c", SUITE, str(tmp_path)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    suite.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can end the workers
    suite.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = [pid for pid in workers if _alive(pid)]
    for pid in orphans:  # leave no sleeper behind when the assertion below fails
        os.kill(pid, signal.SIGKILL)
    assert not orphans


def test_the_throughput_benchmark_times_the_default_trap2_step_with_its_decoy_pass():
    from benchmarks.throughput import build_workload, step_flops
    from training_scripts.objective import RandomDecoys

    *_, objective, _, cfg = build_workload("vit-lora-trap2")
    assert cfg.random_decoys and isinstance(objective.decoys, RandomDecoys) and objective.decoy_lambda == cfg.decoy_lambda
    trap2, _ = step_flops("vit-lora-trap2")
    plain, _ = step_flops("vit-lora-plain")
    # the nominal pass and K off-scale ones are 1 + K plain steps' work; the decoy pass at least one more (its D is a
    # dense matrix beside each LoRA layer, so it costs more than a LoRA pass)
    assert trap2 / plain >= 1 + cfg.scale_samples + 1
