"""Post-hoc defences (PaRaMS, Merge-Lock): the defended release computes the same function with other weights."""
import json

import pytest
import torch

from conftest import tiny_train_args
from models.defences import DefenceOptions, defend_update, transformer_blocks, unit_permutation
from models.export import release_base
from models.updates import UpdateError, load_update
from task_merger import apply_merged
from training_scripts.config import TrainConfig
from training_scripts.vision import train_vision


@pytest.fixture(scope="module")
def full_update(tmp_path_factory):
    return train_vision(TrainConfig(**tiny_train_args(tmp_path_factory.mktemp("full") / "gtsrb-full", peft="full",
                                                      lr=1e-3)))


def _outputs(update, x):
    """The tower's image embeddings with W0 + ΔW of `update`, computed here from the base."""
    base = release_base(update, None)
    net = base.backbone.net
    state0 = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        apply_merged(net, state0, {n: update.delta(n) for n in update.names()}, 1.0)
        return base.backbone(x)


def _images(seed=7):
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("defence", ["params", "merge_lock"])
def test_a_defended_full_update_keeps_the_function_and_moves_the_weights(full_update, tmp_path, defence):
    plain = load_update(full_update)
    defended = load_update(defend_update(full_update, defence, tmp_path / defence))
    x = _images()
    before, after = _outputs(plain, x), _outputs(defended, x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert defended.kind == "full" and defended.task == plain.task
    assert defended.metadata["defence"]["name"] == defence
    assert defended.metadata["defence"]["source_hash"] == plain.content_hash
    card = (defended.path / "README.md").read_text()
    assert "-defended full update" in card and "post-hoc-defence" in card and "unprotected-baseline" not in card
    for name in plain.names():
        if "self_attn.q_proj.weight" in name or "self_attn.k_proj.weight" in name:
            moved = (defended.full[name] - plain.full[name]).norm() / plain.full[name].norm()
            assert moved > 0.5, f"{name} moved only {moved:.2f} of its update"
    fc1 = [n for n in plain.names() if n.endswith("mlp.fc1.weight")]
    assert fc1 and all(torch.equal(defended.full[n], plain.full[n]) != (defence == "params") for n in fc1)


def test_the_defence_is_deterministic_under_its_seed(full_update, tmp_path):
    runs = [load_update(defend_update(full_update, "merge_lock", tmp_path / name, seed=seed)).full
            for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_the_farthest_unit_permutation_is_a_permutation_at_least_as_far_as_the_identity(full_update):
    update = load_update(full_update)
    base = release_base(update, None)
    block = transformer_blocks(base.backbone.net, base.name)[0]
    w0 = {k: v.double() for k, v in base.backbone.net.state_dict().items()}
    w = {k: v + update.full[k].double() if k in update.full else v for k, v in w0.items()}
    perm = unit_permutation(w, w0, block, farthest=True)
    assert sorted(perm.tolist()) == list(range(w0[block.mlp("fc1")].shape[0]))

    def distance(p):
        return ((w[block.mlp("fc1")][p] - w0[block.mlp("fc1")]) ** 2).sum() + \
            ((w[block.mlp("fc1", "bias")][p] - w0[block.mlp("fc1", "bias")]) ** 2).sum() + \
            ((w[block.mlp("fc2")][:, p] - w0[block.mlp("fc2")]) ** 2).sum()
    identity = torch.arange(len(perm))
    assert distance(perm) > distance(identity)
    assert distance(perm) >= max(distance(torch.randperm(len(perm), generator=torch.Generator().manual_seed(s)))
                                 for s in range(20))


def test_params_adapter_variant_is_a_peft_adapter_with_the_same_function(trained_updates, tmp_path):
    from peft import PeftModel

    plain = load_update(trained_updates["gtsrb-plain"])
    out = defend_update(plain.path, "params", tmp_path / "params", DefenceOptions(rank_per_head=3))
    defended = load_update(out)
    x = _images()
    before, after = _outputs(plain, x), _outputs(defended, x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    heads = transformer_blocks(release_base(plain, None).backbone.net, "offline-vit")[0].heads
    rank = plain.lora[plain.names()[0]].A.shape[0] + 3 * heads
    assert all(f.A.shape[0] == rank and f.scaling == 1.0 for f in defended.lora.values())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
    q = [n for n in plain.names() if "q_proj" in n][0]
    assert (defended.delta(q) - plain.delta(q)).norm() > 0.1 * plain.delta(q).norm()
    # PEFT itself loads the defended adapter and computes the same outputs
    base = release_base(plain, None)
    peft_model = PeftModel.from_pretrained(base.backbone.net, str(out)).eval()
    with torch.no_grad():
        via_peft = peft_model(pixel_values=x).image_embeds
    assert (via_peft - before).abs().max() <= 1e-4 * before.abs().max()


def test_merge_lock_refuses_an_adapter_and_every_defence_refuses_a_convnext(trained_updates, tmp_path):
    with pytest.raises(UpdateError, match="no adapter variant"):
        defend_update(trained_updates["gtsrb-plain"], "merge_lock", tmp_path / "ml")
    convnext = train_vision(TrainConfig(**tiny_train_args(tmp_path / "cnx", model="offline-convnext")))
    for defence in ("params", "merge_lock"):
        with pytest.raises(UpdateError, match="no Transformer attention"):
            defend_update(convnext, defence, tmp_path / f"cnx-{defence}")
    assert not (tmp_path / "cnx-params").exists()


def test_an_unknown_defence_or_a_weak_strength_is_refused(full_update, tmp_path):
    with pytest.raises(KeyError, match="unknown defence 'lock'.*merge_lock"):
        defend_update(full_update, "lock", tmp_path / "x")
    with pytest.raises(UpdateError, match="strength must be > 1"):
        defend_update(full_update, "params", tmp_path / "x", DefenceOptions(strength=1.0))


def test_the_defend_command_writes_a_release(full_update, tmp_path, capsys):
    from training_scripts.defend import main

    main(["--update", str(full_update), "--defence", "merge_lock", "--output", str(tmp_path / "ml"), "--seed", "2"])
    assert "wrote" in capsys.readouterr().out
    assert load_update(tmp_path / "ml").metadata["defence"]["seed"] == 2
    with pytest.raises(KeyError, match="unknown defence"):
        main(["--update", str(full_update), "--defence", "mergelock", "--output", str(tmp_path / "x")])


def test_the_defences_command_defends_the_suite_and_reports_standalone_and_merged(tmp_path, monkeypatch):
    import dataclasses

    from conftest import TINY_BASE, TINY_SPLITS
    from eval_scripts.defences import DefencesConfig, defended_dir, run_defences
    from eval_scripts.reproduce import merge_root

    cfg = DefencesConfig(tasks=["gtsrb", "mnist"], runs_root=str(tmp_path / "runs"), jobs=1, peft="full",
                         base_options=dict(TINY_BASE), split_sizes=dict(TINY_SPLITS), max_steps=6, eval_freq=3,
                         warmup_steps=2, batch_size=16, lr=1e-3, head_shots=4, progress=False, val_limit=32,
                         merge_methods=["tv"], merge_spaces=["full"], adaptive=False)
    out = run_defences(cfg)
    report = json.loads((out.parent / "defences.json").read_text())
    alone = report["standalone"]["420"]
    assert set(alone) == {"zero-shot", "fine-tuned", "PaRaMS", "Merge-Lock", "output change"}  # no Trap² runs here
    for defence in ("PaRaMS", "Merge-Lock"):
        for task in ("gtsrb", "mnist"):  # the same function: the same predictions, up to a float tie
            assert abs(alone[defence][task] - alone["fine-tuned"][task]) <= 100 / TINY_SPLITS["test"]
        assert alone["output change"][defence] <= 1e-4
    assert not (tmp_path / "runs" / "offline" / "offline-vit" / "full" / "gtsrb-trap2").exists()
    summary = json.loads((merge_root(cfg, 420, "all-tasks-params") / "tv-full" / "summary.json").read_text())
    assert summary["config"]["protected"] == [str(defended_dir(cfg, "gtsrb", "params", 420))]
    claim = report["merges"]["tv/full"]["PaRaMS"]
    assert claim["protected"]["mean"] == pytest.approx(100 * summary["scenarios"]["protected"]["test"]["gtsrb"])
    assert set(report["merges"]["tv/full"]) == {"PaRaMS", "Merge-Lock", "PaRaMS realigned", "Merge-Lock realigned"}
    realigned = json.loads((merge_root(cfg, 420, "all-tasks-params-realigned") / "tv-full" / "summary.json").read_text())
    assert realigned["config"]["realign"] is True
    text = out.read_text()
    assert "| tv/full |" in text and "The realigning attacker" in text and "| tv/full | Merge-Lock |" in text and (out.parent / "defences.png").stat().st_size > 1000
    assert "all-tasks-merge_lock" in (out.parent / "tables.md").read_text()

    import eval_scripts.defences as dfs

    def refuse(*args, **kwargs):
        raise AssertionError("--report_only computed something")

    for name in ("defend_suite", "run_cells", "standalone"):
        monkeypatch.setattr(dfs, name, refuse)
    out.unlink()
    assert run_defences(dataclasses.replace(cfg, report_only=True)).read_text() == text


@pytest.mark.parametrize("defence", ["params", "merge_lock"])
def test_realigning_undoes_a_defence_and_keeps_the_function(full_update, tmp_path, defence):
    from models.defences import realigned_update

    plain = load_update(full_update)
    defended = load_update(defend_update(full_update, defence, tmp_path / defence))
    base = release_base(plain, None)
    state = {k: v.clone() for k, v in base.backbone.net.state_dict().items()}
    blocks = transformer_blocks(base.backbone.net, base.name)
    back, plain_back = realigned_update(defended, state, blocks), realigned_update(plain, state, blocks)
    assert back.content_hash == defended.content_hash and back.kind == "full"
    for name in plain.names():  # both come back to the same weights: the defence is undone
        scale = plain.full[name].abs().max() + 1e-3
        assert (back.full[name] - plain_back.full[name]).abs().max() <= 1e-3 * scale, name
        if "q_proj.weight" in name:  # the defended update is far from the base; realigned, no farther than plain
            assert defended.full[name].norm() > 5 * plain.full[name].norm()
            assert back.full[name].norm() <= plain.full[name].norm() * 1.001
    x = _images()
    before, after = _outputs(plain, x), _outputs(back, x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def test_realigning_needs_a_space_that_takes_full_updates():
    from eval_scripts.linear_search import MergeConfig

    with pytest.raises(ValueError, match="--realign turns every update into a full one"):
        MergeConfig(target="gtsrb", merge_space="core", realign=True)
    with pytest.raises(ValueError, match="--realign"):
        MergeConfig(target="gtsrb", merge_method="peft_ties", realign=True)
