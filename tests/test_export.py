"""Releases as complete models (from_pretrained) and complete models back as full updates."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_train_args
from models.export import MODEL_WEIGHTS, export_model, import_model
from models.updates import UpdateError, load_update
from models.vision import evaluate
from training_scripts.config import TrainConfig
from training_scripts.vision import train_vision


def _test_accuracy_with(net, update):
    from eval_scripts.evaluators import evaluator_for
    from eval_scripts.linear_search import MergeConfig

    ev = evaluator_for([update], torch.device("cpu"), MergeConfig(target=update.task))
    task = ev.tasks[update.task]
    if net is not None:
        task.classifier.backbone.net = net
    else:
        ev.apply({n: update.delta(n) for n in update.names()}, 1.0)
    return evaluate(task.classifier, task.task, "test", 256)["accuracy"]


@pytest.fixture(scope="module")
def full_update(tmp_path_factory):
    return train_vision(TrainConfig(**tiny_train_args(tmp_path_factory.mktemp("full") / "gtsrb-full", peft="full",
                                                      lambda_reg=0.1, lr=1e-3)))


def test_an_exported_adapter_loads_with_from_pretrained_and_keeps_its_accuracy(trained_updates, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    update = load_update(trained_updates["gtsrb-trap2"])
    out = export_model(update.path, tmp_path / "exported")
    model = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    assert _test_accuracy_with(model, update) == update.metadata["test_accuracy"]
    assert json.loads((out / "trap2_export.json").read_text())["source_hash"] == update.content_hash


def test_a_full_update_exports_and_imports_back_to_the_same_update(full_update, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    update = load_update(full_update)
    out = export_model(full_update, tmp_path / "exported")
    model = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    assert _test_accuracy_with(model, update) == update.metadata["test_accuracy"]
    back = load_update(import_model(out, full_update, tmp_path / "imported", lambda_reg=0.1))
    assert back.kind == "full" and back.protected and back.task == "gtsrb"
    assert set(back.names()) <= set(update.names())
    for name in update.names():
        got = back.full.get(name, torch.zeros_like(update.full[name]))
        torch.testing.assert_close(got, update.full[name], atol=1e-6, rtol=0)
    assert _test_accuracy_with(None, back) == update.metadata["test_accuracy"]  # our evaluator reads it


def test_import_refuses_what_is_not_a_fine_tune_of_the_base(full_update, tmp_path):
    out = export_model(full_update, tmp_path / "exported")
    tensors = load_file(str(out / MODEL_WEIGHTS))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    bad = dict(tensors, **{name: tensors[name][:, :-1].contiguous()})
    (tmp_path / "wrong-shape").mkdir()
    save_file(bad, str(tmp_path / "wrong-shape" / MODEL_WEIGHTS))
    with pytest.raises(UpdateError, match="shape"):
        import_model(tmp_path / "wrong-shape", full_update, tmp_path / "x")
    nan = dict(tensors, **{name: torch.full_like(tensors[name], float("nan"))})
    (tmp_path / "nan").mkdir()
    save_file(nan, str(tmp_path / "nan" / MODEL_WEIGHTS))
    with pytest.raises(UpdateError, match="NaN"):
        import_model(tmp_path / "nan", full_update, tmp_path / "x")
    (tmp_path / "pickled").mkdir()
    torch.save(tensors, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(UpdateError, match="pickled checkpoints are not read"):
        import_model(tmp_path / "pickled", full_update, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written on refusal
