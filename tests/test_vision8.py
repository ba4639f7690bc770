"""The full-scale paths on tiny random-weight models of the same classes and on generated folders
laid out like each real dataset: heads, training (LoRA and full, plain and Trap²), reload, merge."""
import json

import pytest
import torch

from conftest import tiny_train_args
from dataset.vision8 import DATASETS, DatasetMissing, load_splits, validation_split
from models.updates import METADATA_FILE, load_update
from training_scripts.config import TrainConfig
from training_scripts.vision import train_vision


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_dataset_loads_from_its_real_layout(fake_datasets, name):
    splits, classes = load_splits(name, fake_datasets, seed=0)
    assert set(splits) == {"train", "val", "test"}
    for split, ds in splits.items():
        labels = [ds[i][1] for i in range(len(ds))]
        assert len(ds) > 0 and all(0 <= y < len(classes) for y in labels), split
        assert hasattr(ds[0][0], "convert")  # a PIL image
    assert sorted({splits["train"][i][1] for i in range(len(splits["train"]))}) == [0, 1, 2]
    if DATASETS[name].val_from_test:  # 20 % of the official test set (12 images here)
        assert len(splits["val"]) == int(0.2 * 12) and len(splits["val"]) + len(splits["test"]) == 12


def test_validation_carve_is_seeded_disjoint_and_follows_an_index_file(tmp_path):
    val, test = validation_split("gtsrb", 50, seed=3, val_index_dir=None)
    assert (val, test) == validation_split("gtsrb", 50, seed=3, val_index_dir=None)
    assert len(val) == 10 and sorted(val + test) == list(range(50))
    order = torch.arange(49, -1, -1)
    torch.save(order, tmp_path / "gtsrb_shuffled_idxs.pt")
    val, test = validation_split("gtsrb", 50, seed=3, val_index_dir=tmp_path)
    assert val == list(range(49, 39, -1)) and test == list(range(39, -1, -1))
    torch.save(torch.arange(10), tmp_path / "mnist_shuffled_idxs.pt")
    with pytest.raises(ValueError, match="permutation of the 50"):
        validation_split("mnist", 50, seed=0, val_index_dir=tmp_path)
    with pytest.raises(DatasetMissing, match="svhn_shuffled_idxs.pt"):
        validation_split("svhn", 50, seed=0, val_index_dir=tmp_path)


def test_a_missing_dataset_says_where_it_goes_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetMissing) as err:
        load_splits("gtsrb", tmp_path)
    assert "gtsrb/GTSRB/Training" in str(err.value) and "--download true" in str(err.value)
    with pytest.raises(DatasetMissing, match="cannot be downloaded automatically"):
        load_splits("resisc45", tmp_path)


def test_a_missing_dataset_fails_before_any_weights_load(tmp_path, tiny_hf_clip):
    args = tiny_train_args(tmp_path / "run", model="clip-vit-b32", suite="vision8", dataset="cars",
                           data_root=str(tmp_path / "nowhere"))
    args["base_options"] = {"pretrained": str(tmp_path / "no-weights-either")}
    with pytest.raises(DatasetMissing, match="Stanford Cars"):  # not the weights' OSError: data is checked first
        train_vision(TrainConfig(**args))
    assert not (tmp_path / "run").exists()
    args["base_options"] = tiny_hf_clip
    with pytest.raises(KeyError, match="unknown dataset"):
        train_vision(TrainConfig(**{**args, "dataset": "imagenet"}))


@pytest.mark.parametrize("command,model,options", [
    ("generate_clip_heads", "clip-vit-b32", "tiny_hf_clip"),
    ("generate_openclip_heads", "convnext-base-w", "tiny_open_clip"),
])
def test_head_generation_writes_one_normalised_head_per_dataset(fake_datasets, command, model, options, request,
                                                                monkeypatch):
    import runpy

    from dataset.parsing.heads import head_path, main, read_head
    from models.backbones import load_base

    base_options = request.getfixturevalue(options)
    argv = ["--base_options", json.dumps(base_options), "--data_root", str(fake_datasets), "--overwrite", "true"]
    monkeypatch.setattr("sys.argv", [command] + argv)
    runpy.run_module(f"dataset.parsing.{command}", run_name="__main__")  # the real command, default --model
    fp = load_base(model, base_options).fingerprint
    paths = [head_path(fp, name) for name in DATASETS]
    for name, path in zip(DATASETS, paths):
        assert path.parent.name == fp and path.name == f"vision8-{name}.safetensors"
        _, classes = load_splits(name, fake_datasets)
        head = read_head(path, classes)
        assert head.shape == (len(classes), 16) and torch.allclose(head.norm(dim=-1), torch.ones(len(classes)))
        with pytest.raises(ValueError, match="regenerate"):
            read_head(path, classes[:-1])
    with pytest.raises(SystemExit):  # the other family's command refuses this backbone
        main(["--model", model] + argv, family="open-clip" if command == "generate_clip_heads" else "hf-clip")


def _vision8_args(tmp_path, fake_datasets, options, name, model="clip-vit-b32", **extra):
    args = tiny_train_args(tmp_path / name, model=model, suite="vision8", data_root=str(fake_datasets),
                           batch_size=6, max_steps=6, eval_freq=3, **extra)
    args["base_options"] = options
    args.pop("split_sizes")
    return args


def test_clip_lora_and_full_train_protected_and_plain_then_merge(tmp_path, fake_datasets, tiny_hf_clip):
    from eval_scripts.linear_search import MergeConfig, run_merge_eval

    runs = {}
    for name, extra in {"gtsrb-trap2": dict(dataset="gtsrb", lambda_reg=0.1),
                        "gtsrb-plain": dict(dataset="gtsrb"),
                        "mnist-plain": dict(dataset="mnist"),
                        "eurosat-full-plain": dict(dataset="eurosat", peft="full", lr=1e-4),
                        "eurosat-full-trap2": dict(dataset="eurosat", peft="full", lambda_reg=0.1, lr=1e-4,
                                                   gradient_checkpointing=True)}.items():
        runs[name] = train_vision(TrainConfig(**_vision8_args(tmp_path, fake_datasets, tiny_hf_clip, name, **extra)))
    for name, path in runs.items():
        update = load_update(path)
        meta = json.loads((path / METADATA_FILE).read_text())
        assert meta["suite"] == "vision8" and meta["base_model"] == "clip-vit-b32"
        assert update.kind == ("full" if "full" in name else "lora")
        assert meta["n_classes"] == {"gtsrb": 43, "mnist": 10, "eurosat": 3}[meta["task"]]
    cfg = MergeConfig(target="gtsrb", protected=[str(runs["gtsrb-trap2"])], control=[str(runs["gtsrb-plain"])],
                      others=[str(runs["mnist-plain"])], merge_method="ties", merge_space="core", coef_stop=0.3,
                      method_grid=False, output_dir=str(tmp_path / "merge"), progress=False,
                      data_root=str(fake_datasets), base_options=tiny_hf_clip)
    summary = json.loads((run_merge_eval(cfg) / "summary.json").read_text())
    for scenario in ("protected", "control"):
        accs = summary["scenarios"][scenario]["test"]
        assert set(accs) == {"gtsrb", "mnist"} and all(0 <= a <= 1 for a in accs.values())


def test_open_clip_convnext_lora_on_fc_layers(tmp_path, fake_datasets, tiny_open_clip):
    from peft import PeftModel

    from models.backbones import load_base

    path = train_vision(TrainConfig(**_vision8_args(tmp_path, fake_datasets, tiny_open_clip, "dtd-trap2",
                                                    model="convnext-base-w", dataset="dtd", lambda_reg=0.1,
                                                    gradient_checkpointing=True)))
    update = load_update(path)
    assert update.names() and all(n.endswith(("mlp.fc1.weight", "mlp.fc2.weight")) for n in update.names())
    base = load_base("convnext-base-w", tiny_open_clip)
    update.check_base(base.fingerprint, base.backbone.net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    peft_model = PeftModel.from_pretrained(load_base("convnext-base-w", tiny_open_clip).backbone.net, path).eval()
    state = dict(base.backbone.net.state_dict())
    with torch.no_grad():
        for name in update.names():
            state[name] = state[name] + update.delta(name)
        base.backbone.net.load_state_dict(state)
        assert torch.allclose(base.backbone.net.eval()(x), peft_model(x), atol=1e-5)


def test_worker_prefetching_gives_the_same_batches(fake_datasets, tiny_hf_clip):
    from training_scripts.vision import StepBatches
    from models.backbones import load_base
    from models.vision import DataSettings, load_task

    base = load_base("clip-vit-b32", tiny_hf_clip)
    streams = []
    for workers in (0, 2):
        task = load_task(base, "svhn", DataSettings(suite="vision8", data_root=str(fake_datasets), num_workers=workers))
        batch_at = StepBatches(task, 4, seed=1, num_workers=workers, device=torch.device("cpu"))
        streams.append([batch_at(step) for step in (0, 1, 2, 3, 7, 8)])  # 4 batches an epoch; a jump to 7
    for (xa, ya), (xb, yb) in zip(*streams):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert streams[0][0][0].shape == (4, 3, 32, 32)
