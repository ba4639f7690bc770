"""DoRA: what scaling by s means, training, saving, loading and merging in full space."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_train_args
from models.updates import DoraFactors, ScaledUpdate, UpdateError, load_update
from task_merger import TaskMerger
from training_scripts.config import TrainConfig
from training_scripts.vision import train_vision


def _dora_net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True))
    with torch.no_grad():  # a trained-looking adapter: B and the magnitudes moved away from their start
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_dora_scale_zero_is_the_base_and_scale_one_the_trained_layer():
    model = _dora_net()
    update = ScaledUpdate.lora(model)
    assert any("magnitude" in n for n in update.params)
    x = torch.randn(7, 6)
    with model.disable_adapter():
        base = model(x)
    trained = model(x)
    with torch.no_grad():
        with update.rescaled(model, 0.0):
            torch.testing.assert_close(model(x), base, atol=1e-5, rtol=1e-5)
        with update.rescaled(model, 1.0):
            torch.testing.assert_close(model(x), trained)
        with update.rescaled(model, 0.5):
            half = model(x)
    assert not torch.allclose(half, base) and not torch.allclose(half, trained)


def test_dora_factors_give_the_trained_layers_weight():
    model = _dora_net(1)
    layer = model.base_model.model[0]
    w0 = layer.base_layer.weight.detach()
    f = DoraFactors(layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
                    layer.scaling["default"], layer.lora_magnitude_vector["default"].weight.detach(), w0)
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = layer(x)
    torch.testing.assert_close(x @ (w0 + f.delta()).T + layer.base_layer.bias, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UpdateError, match="depends on the base"):
        DoraFactors(f.A, f.B, f.scaling, f.magnitude).delta()


@pytest.fixture(scope="module")
def dora_updates(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    return [train_vision(TrainConfig(**tiny_train_args(root / name, dataset=task, lambda_reg=lam, use_dora=True)))
            for name, task, lam in (("gtsrb-trap2", "gtsrb", 0.1), ("mnist-plain", "mnist", 0.0))]


def test_a_dora_run_trains_saves_loads_and_its_evaluation_matches_the_trainer(dora_updates):
    from eval_scripts.evaluators import evaluator_for
    from eval_scripts.linear_search import MergeConfig

    update = load_update(dora_updates[0])
    assert all(isinstance(f, DoraFactors) for f in update.lora.values())
    ev = evaluator_for([update], torch.device("cpu"), MergeConfig(target="gtsrb"))
    ev.apply({n: update.delta(n) for n in update.names()}, 1.0)
    assert ev.accuracy("gtsrb", "test") == update.metadata["test_accuracy"]  # ΔW = W(1) − W0 is the trained model


def test_dora_merges_in_full_and_knots_space_and_refuses_core_and_peft(dora_updates):
    from eval_scripts.evaluators import evaluator_for
    from eval_scripts.linear_search import MergeConfig
    from eval_scripts.peft_merge import PeftMerger

    updates = [load_update(p) for p in dora_updates]
    ev = evaluator_for(updates, torch.device("cpu"), MergeConfig(target="gtsrb"))  # attaches W0
    name = updates[0].names()[0]
    merged = TaskMerger(updates, "full").merge("tv")[name]
    torch.testing.assert_close(merged, updates[0].delta(name) + updates[1].delta(name))
    knots = TaskMerger(updates, "knots").merge("tv")[name]
    torch.testing.assert_close(knots, merged, atol=1e-5, rtol=1e-4)  # KnOTS + TA reconstructs the sum
    with pytest.raises(UpdateError, match="DoRA"):
        TaskMerger(updates, "core").merge("tv")
    with pytest.raises(UpdateError, match="DoRA"):
        PeftMerger(updates, ev.net)


def test_an_adapter_whose_config_and_tensors_disagree_on_dora_is_refused(dora_updates, tmp_path):
    import json
    import shutil

    folder = tmp_path / "lying"
    shutil.copytree(dora_updates[0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = False
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UpdateError, match="magnitude vector"):
        load_update(folder)


def test_dora_magnitude_anchor_is_the_base_row_norm_where_peft_starts():
    torch.manual_seed(3)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    update = ScaledUpdate.lora(model)
    (name,) = [n for n in update.params if "magnitude" in n]
    torch.testing.assert_close(update.anchors[name], update.params[name].detach())
