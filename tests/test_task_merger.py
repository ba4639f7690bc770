import math

import pytest
import torch

import task_merger as tm
from models.updates import LoraFactors, ReleasedUpdate, UpdateError


def lora_updates(T=3, m=12, n=10, r=3, seed=0, names=("layer.weight",)):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for t in range(T):
        factors = {name: LoraFactors(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 2.0 / r)
                   for name in names}
        ups.append(ReleasedUpdate(f"t{t}", "lora", {"base_fingerprint": "x", "task": f"t{t}"}, lora=factors))
    return ups


def full_updates(T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ReleasedUpdate(f"t{t}", "full", {"base_fingerprint": "x"},
                           full={"w": torch.randn(8, 6, generator=g), "b": torch.randn(8, generator=g),
                                 "conv": torch.randn(4, 2, 3, 3, generator=g)}) for t in range(T)]


def full_delta_sum(ups, name="layer.weight"):
    return sum(u.delta(name) for u in ups)


@pytest.mark.parametrize("space", ["full", "knots", "core"])
def test_task_arithmetic_is_exact_in_every_space(space):
    ups = lora_updates()
    merged = tm.TaskMerger(ups, space).merge("tv")["layer.weight"]
    assert torch.allclose(merged, full_delta_sum(ups), atol=1e-5)


@pytest.mark.parametrize("space", ["full", "knots", "core"])
def test_task_coefficients_scale_each_update(space):
    ups = lora_updates()
    merged = tm.TaskMerger(ups, space, task_coefficients=[0.5, 2.0, -1.0]).merge("tv")["layer.weight"]
    expected = 0.5 * ups[0].delta("layer.weight") + 2 * ups[1].delta("layer.weight") - ups[2].delta("layer.weight")
    assert torch.allclose(merged, expected, atol=1e-5)


@pytest.mark.parametrize("space", ["full", "knots", "core"])
@pytest.mark.parametrize("method", ["tv", "mean", "ties", "dare", "dare_ties", "tsv", "cart"])
def test_one_update_with_coefficient_one_reproduces_it(space, method):
    ups = lora_updates(T=1)
    params = {"ties": {"top_k": 100}, "dare_ties": {"top_k": 100, "p": 0.0}, "dare": {"p": 0.0}}.get(method, {})
    merged = tm.TaskMerger(ups, space).merge(method, **params)["layer.weight"]
    assert torch.allclose(merged, ups[0].delta("layer.weight"), atol=1e-4)


@pytest.mark.parametrize("method", ["tv", "mean"])
def test_a_linear_merge_is_the_full_space_merge_bit_for_bit_in_every_space(method):
    """Task Arithmetic commutes with every space's change of basis, so it is computed in full space: the cells
    of every space then merge to the same bits (and share their evaluations)."""
    ups = lora_updates()
    full = tm.TaskMerger(ups, "full").merge(method)["layer.weight"]
    for space in ("knots", "core"):
        merger = tm.TaskMerger(ups, space)
        assert torch.equal(merger.merge(method)["layer.weight"], full)
        merger.merge(method, isotropic=True)  # Iso-C flattens the spectrum in the space's own coordinates
        assert (space, "layer.weight") in merger._decompositions


def test_knots_and_core_differ_from_full_for_nonlinear_methods():
    ups = lora_updates()
    full = tm.TaskMerger(ups, "full").merge("ties", top_k=20)["layer.weight"]
    for space in ("knots", "core"):
        other = tm.TaskMerger(ups, space).merge("ties", top_k=20)["layer.weight"]
        assert not torch.allclose(full, other, atol=1e-3)


def test_ties_top100_on_sign_agreeing_updates_is_mean():
    base = torch.rand(5, 4) + 0.1
    deltas = [base * (k + 1) for k in range(3)]
    assert torch.allclose(tm.ties(deltas, top_k=100), sum(deltas) / 3)
    negative = [-d for d in deltas]
    assert torch.allclose(tm.ties(negative, top_k=100), -sum(deltas) / 3)


def test_ties_trim_elect_disjoint_mean_by_hand():
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    b = torch.tensor([-1.0, -2.0, 0.25, 4.0])
    # top 50 %: a -> [3, 0, 0, 2], b -> [0, -2, 0, 4]; signs of sums: +, -, 0 -> majority(+), +
    out = tm.ties([a, b], top_k=50)
    assert torch.allclose(out, torch.tensor([3.0, -2.0, 0.0, 3.0]))


def test_dare_identity_at_zero_and_seeded():
    deltas = [torch.randn(6, 5) for _ in range(3)]
    assert torch.allclose(tm.dare(deltas, p=0.0), sum(deltas))
    g = lambda: torch.Generator().manual_seed(7)
    assert torch.equal(tm.dare(deltas, 0.5, g()), tm.dare(deltas, 0.5, g()))
    assert not torch.equal(tm.dare(deltas, 0.5, g()), tm.dare(deltas, 0.5, torch.Generator().manual_seed(8)))
    # survivors are rescaled by exactly 1/(1-p), the rest are zero
    d = torch.randn(1000)
    out = tm.dare_mask(d, 0.3, g())
    kept = out != 0
    assert torch.allclose(out[kept], d[kept] / 0.7)
    assert abs(kept.float().mean() - 0.7) < 0.05


def test_merger_dare_is_reproducible_across_instances():
    ups = lora_updates()
    a = tm.TaskMerger(ups, "full", seed=3).merge("dare", p=0.5)["layer.weight"]
    b = tm.TaskMerger(ups, "full", seed=3).merge("dare", p=0.5)["layer.weight"]
    assert torch.equal(a, b)


def test_tsv_of_one_update_returns_it_and_merges_orthogonal_tasks_exactly():
    d = torch.randn(7, 5)
    assert torch.allclose(tm.tsv([d]), d, atol=1e-5)
    # two updates living in orthogonal row/column spaces with rank <= k/T are summed exactly
    e1, e2 = torch.zeros(6, 6), torch.zeros(6, 6)
    e1[:3, :3], e2[3:, 3:] = torch.diag(torch.tensor([3.0, 2.0, 1.0])), torch.diag(torch.tensor([4.0, 1.5, 0.5]))
    assert torch.allclose(tm.tsv([e1, e2]), e1 + e2, atol=1e-5)


def test_cart_matches_formula_on_small_case():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(10, 8, generator=g) for _ in range(3)]
    avg = sum(deltas) / 3
    r = math.ceil(0.16 * 8)  # 2 singular values
    expected = avg.clone()
    for d in deltas:
        u, s, vh = torch.linalg.svd(d - avg)
        expected += 0.1 * (u[:, :r] * s[:r]) @ vh[:r]
    assert torch.allclose(tm.cart(deltas, rank=0.16, beta=0.1), expected, atol=1e-5)


def test_isotropize_flattens_spectrum():
    m = torch.randn(6, 4)
    s = torch.linalg.svdvals(tm.isotropize(m))
    assert torch.allclose(s, torch.full_like(s, torch.linalg.svdvals(m).mean()), atol=1e-5)


def test_isotropize_averages_only_the_nonzero_singular_values():
    """As the release: a rank-2 merge stays rank 2, its two singular values replaced by their mean (the
    averaged-over-all rule would shrink them and fill the directions the merge does not span)."""
    m = torch.randn(8, 2) @ torch.randn(2, 6)
    s, iso = torch.linalg.svdvals(m), torch.linalg.svdvals(tm.isotropize(m))
    assert torch.allclose(iso[:2], s[:2].mean().expand(2), atol=1e-5) and (iso[2:] < 1e-5).all()


def test_full_updates_vectors_fall_back_explicitly_and_core_refuses():
    ups = full_updates()
    merger = tm.TaskMerger(ups, "knots")
    merged = merger.merge("tv")
    assert merger.fallbacks == ["b"]
    for name in ("w", "b", "conv"):
        assert torch.allclose(merged[name], sum(u.full[name] for u in ups), atol=1e-5)
    assert torch.allclose(tm.TaskMerger(ups, "full").merge("tsv")["b"], sum(u.full["b"] for u in ups) / 3)
    with pytest.raises(UpdateError, match="core space needs LoRA"):
        tm.TaskMerger(ups, "core").merge("tv")


def test_missing_layers_contribute_zero():
    a = lora_updates(T=1, names=("x.weight", "y.weight"))[0]
    b = lora_updates(T=1, seed=1, names=("x.weight",))[0]
    merged = tm.TaskMerger([a, b], "core").merge("tv")
    assert torch.allclose(merged["y.weight"], a.delta("y.weight"), atol=1e-5)
    assert torch.allclose(merged["x.weight"], a.delta("x.weight") + b.delta("x.weight"), atol=1e-5)


def test_merges_are_cached_and_inputs_validated():
    ups = lora_updates()
    merger = tm.TaskMerger(ups, "core")
    assert merger.merge("ties", top_k=30) is merger.merge("ties", top_k=30)
    with pytest.raises(ValueError, match="takes"):
        merger.merge("ties", rank=3)
    with pytest.raises(KeyError):
        merger.merge("nope")
    other = lora_updates(T=1)[0]
    other.metadata["base_fingerprint"] = "y"
    with pytest.raises(UpdateError, match="different bases"):
        tm.TaskMerger(ups + [other])


def test_agrees_with_peft_merge_utils_where_definitions_coincide():
    """PEFT's TIES (`total` sign) and magnitude pruning equal ours for unit weights. They differ in one
    documented place: where the signed sum of an entry is exactly zero PEFT elects +1, while TIES
    (and we) elect the majority sign of the layer. PEFT's DARE draws a different random mask (bernoulli
    on the density); its rescaling matches ours, which we check on the entries both keep."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(20, 16, generator=g) for _ in range(4)]
    ours = tm.ties(deltas, top_k=30)
    theirs = merge_utils.ties(deltas, torch.ones(4), density=0.3, majority_sign_method="total")
    assert torch.allclose(ours, theirs, atol=1e-6)
    for d in deltas:
        assert torch.equal(tm.trim_top_k(d, 30), merge_utils.prune(d, 0.3, "magnitude"))
    torch.manual_seed(0)
    peft_dare = merge_utils.prune(deltas[0], 0.6, "random", rescale=True)
    kept = peft_dare != 0
    assert torch.allclose(peft_dare[kept], tm.dare_mask(deltas[0], 0.0, g)[kept] / 0.6)
    # the documented difference: an exactly cancelling entry, with a negative layer majority
    a, b = torch.tensor([1.0, -5.0, -3.0]), torch.tensor([-1.0, -4.0, -2.0])
    assert tm.ties([a, b], 100)[0] == -1.0
    assert merge_utils.ties([a, b], torch.ones(2), density=1.0)[0] == 1.0


def test_apply_merged_sets_base_plus_coefficient():
    net = torch.nn.Linear(10, 12, bias=False)
    base = {"weight": torch.randn(12, 10)}
    merged = {"weight": torch.randn(12, 10)}
    tm.apply_merged(net, base, merged, 0.3)
    assert torch.allclose(net.weight, base["weight"] + 0.3 * merged["weight"])


def test_isotropized_core_merge_stays_in_the_adapters_span():
    """Core space isotropizes the small core matrix before rebuilding, so the merge keeps the adapters' rank."""
    ups = lora_updates()
    merged = tm.TaskMerger(ups, "core").merge("tv", isotropic=True)
    for name, delta in merged.items():
        if delta.dim() == 2:
            rank = sum(u.lora[name].A.shape[0] for u in ups if name in u.lora)
            assert int((torch.linalg.svdvals(delta) > 1e-4).sum()) <= rank


def test_ties_trim_keeps_one_more_entry_under_the_release_rule():
    delta = torch.arange(1.0, 11.0)  # 10 entries, top 30 %: int(3.0) = 3 by the spec, 4 by the release's code
    assert int((tm.trim_top_k(delta, 30.0) != 0).sum()) == 3
    assert int((tm.trim_top_k(delta, 30.0, one_more=True) != 0).sum()) == 4
    ups = lora_updates()
    spec = tm.TaskMerger(ups, "full").merge("ties", top_k=30.0)
    release = tm.TaskMerger(ups, "full", trim_one_more=True).merge("ties", top_k=30.0)
    assert any(not torch.equal(spec[n], release[n]) for n in spec)
