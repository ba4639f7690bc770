"""Shared fixtures: a tiny offline base and tiny task splits, so end-to-end runs take seconds."""
import os
from pathlib import Path

import pytest

# Caches go to a per-session folder unless CI points TRAP2_DATA somewhere on purpose.
os.environ.setdefault("TRAP2_DATA", str(Path(__file__).resolve().parent.parent / "data"))

TINY_BASE = {"steps": 15, "pretext_train": 256, "batch_size": 32, "warmup": 5}
TINY_SPLITS = {"train": 160, "val": 64, "test": 64}


def tiny_train_args(out_dir, dataset="gtsrb", lambda_reg=0.0, peft="lora", model="offline-vit", **extra):
    args = dict(dataset=dataset, model=model, peft=peft, lambda_reg=lambda_reg, base_options=dict(TINY_BASE),
                split_sizes=dict(TINY_SPLITS), max_steps=8, eval_freq=4, warmup_steps=2, batch_size=16,
                lr=3e-3, head_shots=4, output_dir=str(out_dir), progress=False, seed=420)
    args.update(extra)
    return args


@pytest.fixture(scope="session")
def trained_updates(tmp_path_factory):
    """Three tiny LoRA updates: gtsrb protected, gtsrb plain, mnist plain."""
    from training_scripts.config import TrainConfig
    from training_scripts.vision import train_vision

    root = tmp_path_factory.mktemp("runs")
    paths = {
        "gtsrb-trap2": train_vision(TrainConfig(**tiny_train_args(root / "gtsrb-trap2", lambda_reg=0.1))),
        "gtsrb-plain": train_vision(TrainConfig(**tiny_train_args(root / "gtsrb-plain"))),
        "mnist-plain": train_vision(TrainConfig(**tiny_train_args(root / "mnist-plain", dataset="mnist"))),
    }
    return paths


@pytest.fixture(scope="session")
def fake_datasets(tmp_path_factory):
    """The eight datasets in their real layouts, three classes each (tests/fake_vision8.py)."""
    from fake_vision8 import write_all

    return write_all(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory):
    """A random-weight transformers CLIPModel with a tokenizer and image processor built here."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-hf-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in map(chr, range(33, 127)):  # one token per printable character, with and without word end
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, projection_dim=16), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return {"pretrained": str(folder)}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """A random-weight OpenCLIP model: timm convnext_tiny image tower (Linear MLPs like convnext_base),
    one-layer text tower."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-open-clip")
    config = folder / "trap2-tiny-convnext.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "convnext_tiny", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("trap2-tiny-convnext", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    return {"model_name": "trap2-tiny-convnext", "config_file": str(config),
            "pretrained": str(folder / "weights.safetensors")}


def record_weights_per_step(out_dir):
    """For the torchrun workers: an `on_step` callback hashing this process's trainable weights after every
    step, and a function writing the hashes to <out_dir>/rank<N>.json."""
    import hashlib
    import json

    from models import distributed

    hashes = []

    def on_step(step, params):
        hashes.append(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest())

    def write():
        with open(f"{out_dir}/rank{distributed.rank()}.json", "w") as fh:
            json.dump({"hashes": hashes, "world": distributed.world_size()}, fh)

    return on_step, write


def weights_of_two_processes(worker: str, out_dir, *args: str) -> list[list[str]]:
    """Runs tests/<worker> under torchrun with two CPU processes and returns each rank's weight hashes per
    step (written by `record_weights_per_step`); fails with the workers' stderr if they fail."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port, so concurrent test runs on one machine do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo}:{repo / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(repo / "tests" / worker), str(out_dir), *args]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    return [r["hashes"] for r in ranks]
