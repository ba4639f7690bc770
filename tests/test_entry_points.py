"""Every command line: the YAML's λ reaches the objective the trainer builds, and an unknown key fails."""
import runpy
import sys
from pathlib import Path

import pytest

from models.options import parse_config
from training_scripts.config import RELEASE_LAMBDA, TrainConfig
from training_scripts.runs import build_objective

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


OWN_MAIN = {"training_scripts", "training_scripts.suite", "training_scripts.math", "eval_scripts",
            "eval_scripts.reproduce"}


def _lambdas_reached(module: str, argv: list[str], monkeypatch, tmp_path) -> list[float]:
    """Runs `python -m module argv` with its training replaced by building the objective(s) it would train:
    a module's own main(), or the alias file itself (each paper alias is a file that calls one)."""
    import importlib

    import eval_scripts.__main__
    import eval_scripts.reproduce
    import training_scripts.__main__
    import training_scripts.math
    import training_scripts.suite

    reached = []

    def one_run(cfg):
        reached.append(build_objective(cfg).lambda_reg)

    def suite(cfg):
        tasks = cfg.tasks or ["gtsrb"]
        reached.extend(build_objective(run).lambda_reg for run in training_scripts.suite.suite_runs(cfg, tasks))

    monkeypatch.setattr(training_scripts.__main__, "train_vision", one_run)
    monkeypatch.setattr(training_scripts.math, "train_math", one_run)
    monkeypatch.setattr(training_scripts.suite, "train_suite", suite)
    monkeypatch.setattr(eval_scripts.reproduce, "reproduce", suite)
    monkeypatch.setattr(eval_scripts.__main__, "run_merge_eval", one_run)
    monkeypatch.chdir(tmp_path)  # nothing may touch the repository's runs/
    if module in OWN_MAIN:
        importlib.import_module(module if "." in module else f"{module}.__main__").main(argv)
    else:
        monkeypatch.setattr(sys, "argv", [module] + argv)
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    return reached


# (module, extra argv, λ the run(s) must get from a YAML λ of 0.07: None = the YAML's own)
ENTRY_POINTS = [
    ("training_scripts", ["--dataset", "gtsrb"], [0.07]),
    ("training_scripts.8vision_training", ["--dataset", "gtsrb"], [0.0]),
    ("training_scripts.8vision_training_full", ["--dataset", "gtsrb"], [0.0]),
    ("training_scripts.8vision_training_trap2", ["--dataset", "gtsrb"], [0.07]),
    ("training_scripts.8vision_training_full_trap2", ["--dataset", "gtsrb"], [0.07]),
    ("training_scripts.suite", ["--tasks", "gtsrb", "mnist"], [0.07, 0.07, 0.0, 0.0]),
    ("eval_scripts.reproduce", ["--tasks", "gtsrb", "mnist"], [0.07, 0.07, 0.0, 0.0]),
    ("training_scripts.math", ["--task", "gsm8k"], [0.07]),
    ("training_scripts.math_training", ["--task", "gsm8k"], [0.0]),
    ("training_scripts.math_training_trap2", ["--task", "gsm8k"], [0.07]),
]


@pytest.mark.parametrize("module,argv,expected", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_yaml_lambda_reaches_the_objective(module, argv, expected, tmp_path, monkeypatch):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("lambda_reg: 0.07\nseed: 421\n")
    assert _lambdas_reached(module, ["--config", str(yaml)] + argv, monkeypatch, tmp_path) == expected


@pytest.mark.parametrize("module,argv,expected", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_unknown_yaml_key_fails(module, argv, expected, tmp_path, monkeypatch, capsys):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("lambda_reg: 0.07\nprotect_lambda: 0.07\n")  # the old name of λ is an unknown key too
    with pytest.raises(SystemExit):
        _lambdas_reached(module, ["--config", str(yaml)] + argv, monkeypatch, tmp_path)
    assert "unknown options ['protect_lambda']" in capsys.readouterr().err


def test_merge_command_refuses_an_unknown_key(tmp_path, monkeypatch, capsys):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("target: gtsrb\nlambda_reg: 0.07\n")  # λ is a training option, not a merge one
    with pytest.raises(SystemExit):
        _lambdas_reached("eval_scripts", ["--config", str(yaml)], monkeypatch, tmp_path)
    assert "unknown options ['lambda_reg']" in capsys.readouterr().err


def test_paper_aliases_choose_protection_not_lambda(monkeypatch, capsys, tmp_path):
    """Protected aliases without a λ take the release's CLI default; a plain alias refuses a λ; a protected
    one refuses λ = 0."""
    assert _lambdas_reached("training_scripts.8vision_training_trap2", ["--dataset", "gtsrb"],
                            monkeypatch, tmp_path) == [RELEASE_LAMBDA]
    assert _lambdas_reached("training_scripts.math_training_trap2", ["--task", "gsm8k"], monkeypatch, tmp_path) == [RELEASE_LAMBDA]
    assert _lambdas_reached("training_scripts", ["--dataset", "gtsrb"], monkeypatch, tmp_path) == [0.0]
    for module, argv in (("training_scripts.8vision_training", ["--lambda_reg", "0.2"]),
                         ("training_scripts.8vision_training_trap2", ["--lambda_reg", "0"]),
                         ("training_scripts.math_training_trap2", ["--lambda_reg", "0"])):
        with pytest.raises(SystemExit):
            _lambdas_reached(module, ["--dataset", "gtsrb"] + argv if "math" not in module else argv, monkeypatch, tmp_path)
    assert "contradicts" in capsys.readouterr().err


def test_every_shipped_config_parses():
    """Each YAML under configs/ is valid for every command that reads it, and gives the suite its λ."""
    from eval_scripts.grid import GridConfig
    from training_scripts.math import MathConfig
    from training_scripts.suite import SuiteConfig

    configs = sorted(CONFIGS.glob("**/*.yaml"))
    assert len(configs) >= 14
    for path in configs:
        if path.parent.name == "merge":
            cfg = parse_config(GridConfig, ["--config", str(path)])
            assert cfg.target and cfg.protected and cfg.control
            assert len(cfg.others) == (1 if "math" in path.name or "llama" in path.name else 7)
        elif path.parent.name == "math":
            assert parse_config(MathConfig, ["--config", str(path), "--task", "gsm8k"]).model
        else:
            suite = parse_config(SuiteConfig, ["--config", str(path)])
            assert suite.lambda_reg > 0
            if suite.tasks is not None:  # a suite-only key: one run has no use for it, so it is refused
                with pytest.raises(SystemExit):
                    parse_config(TrainConfig, ["--config", str(path), "--dataset", "gtsrb"])
                continue
            one = parse_config(TrainConfig, ["--config", str(path), "--dataset", "gtsrb"])
            assert one.model == suite.model and one.lambda_reg == suite.lambda_reg


def test_every_option_has_help_text(capsys):
    """--help explains every option of every command (the text lives on the config field)."""
    import dataclasses

    from eval_scripts.defences import DefencesConfig
    from eval_scripts.grid import GridConfig
    from eval_scripts.linear_search import MergeConfig
    from eval_scripts.reproduce import ReproduceConfig
    from eval_scripts.scaling_curve import CurveConfig
    from eval_scripts.tables import TablesConfig
    from training_scripts.math import MathConfig
    from training_scripts.defend import DefendConfig
    from training_scripts.suite import SuiteConfig

    for cls in (TrainConfig, MathConfig, SuiteConfig, ReproduceConfig, MergeConfig, GridConfig, CurveConfig,
                TablesConfig, DefendConfig, DefencesConfig):
        with pytest.raises(SystemExit):
            parse_config(cls, ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 5, f"{cls.__name__}.{f.name} has no help text"
            assert " ".join(f.metadata["help"].split())[:40] in text, f"--{f.name} help missing from {cls.__name__}"


def test_the_readme_protect_your_own_model_examples_run(capsys, tmp_path, monkeypatch):
    """The README's code blocks under 'Protect your own model' run as written (own loop, then Trainer)."""
    text = (CONFIGS.parent / "README.md").read_text()
    section = text[text.index("## Protect your own model"):text.index("## Train\n")]
    blocks = [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)  # the Trainer example writes under runs/
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "loss_off" in printed and "objective" in printed


PAPER_VISION = sorted((CONFIGS / "vision8").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER_VISION, ids=[p.stem for p in PAPER_VISION])
def test_paper_configs_train_like_the_release(path, monkeypatch, tmp_path):
    """Issue 15: the suite's plain runs get the release's plain-trainer optimiser, every run trains in fp32
    with the release's LR horizon and the YAML's λ, and full fine-tuning freezes the projection; the plain
    paper alias gets the same plain settings from the same YAML."""
    import yaml

    from training_scripts.suite import SuiteConfig, suite_runs

    written = yaml.safe_load(path.read_text())
    suite = parse_config(SuiteConfig, ["--config", str(path)])
    runs = suite_runs(suite, ["gtsrb"])
    protected, plain = runs
    assert protected.lambda_reg == written["lambda_reg"] > 0 and plain.lambda_reg == 0
    assert (plain.weight_decay, plain.beta2, plain.eps, plain.max_grad_norm) == (0.1, 0.999, 1e-8, None)
    assert (protected.weight_decay, protected.beta2, protected.eps, protected.max_grad_norm) == (0.0, 0.98, 1e-6, 1.0)
    for run in runs:
        assert run.amp == "none" and run.schedule_steps == 100000
        assert run.freeze_projection == (run.peft == "full")
    captured = []
    import training_scripts.__main__

    monkeypatch.setattr(training_scripts.__main__, "train_vision", captured.append)
    monkeypatch.setattr(sys, "argv", ["8vision_training", "--config", str(path), "--dataset", "gtsrb"])
    runpy.run_module("training_scripts.8vision_training", run_name="__main__", alter_sys=False)
    assert (captured[0].lambda_reg, captured[0].weight_decay, captured[0].max_grad_norm) == (0.0, 0.1, None)


def test_frozen_projection_is_neither_trained_nor_released(tmp_path):
    from conftest import tiny_train_args

    from models.updates import load_update
    from training_scripts.vision import train_vision

    out = train_vision(TrainConfig(**tiny_train_args(tmp_path / "full", peft="full", lambda_reg=0.05, max_steps=2,
                                                     eval_freq=2, freeze_projection=True)))
    names = load_update(out).names()
    assert names and "visual_projection.weight" not in names
    assert any(n.startswith("vision_model.") for n in names)


def test_no_clipping_and_the_schedule_horizon_reach_the_loop():
    from models.runtime import resolve_device
    from training_scripts.runs import loop_settings

    cfg = TrainConfig(max_grad_norm=None, schedule_steps=100000, max_steps=10)
    settings = loop_settings(cfg, resolve_device("cpu"))
    assert settings.max_grad_norm is None and settings.schedule_steps == 100000
    with pytest.raises(ValueError, match="unknown options"):
        TrainConfig(unprotected={"weight_decayy": 0.1})


def test_the_paper_math_configs_follow_the_release():
    from eval_scripts.grid import GridConfig
    from training_scripts.math import MathConfig

    train = parse_config(MathConfig, ["--config", str(CONFIGS / "math/llama31_8b.yaml"), "--task", "gsm8k"])
    assert (train.weight_decay, train.warmup_steps, train.schedule_steps, train.patience) == (0.01, 2000, 100000, 10)
    assert (train.stop_on, train.padding_side, train.model_dtype) == ("loss", "left", "fp16")
    merge = parse_config(GridConfig, ["--config", str(CONFIGS / "merge/llama31_8b_gsm8k.yaml")])
    assert merge.coefficients()[-1] == 10.0 and merge.normalise is False and merge.search_rule == "release"
    assert merge.protected_others and merge.others
