import math

import pytest
import torch
from torch import nn

from models.updates import ScaledUpdate
from training_scripts.objective import SCALE_WEIGHTS, DecoyPartners, RandomDecoys, ScaleSampler, Trap2Objective


def mse_loss(forward, batch):
    """Per-example losses, as the objective requires (it averages them itself)."""
    x, y = batch
    return ((forward(x) - y) ** 2).mean(1)


def test_sampler_never_inside_band_and_covers_both_sides():
    sampler = ScaleSampler(0.05, 2.0, 0.05)
    s = torch.tensor(sampler.sample(20000, torch.Generator().manual_seed(0)))
    assert ((s - 1).abs() >= 0.05).all()
    assert s.min() >= 0.05 and s.max() <= 2.0
    low, high = (s < 1).float().mean(), (s > 1).float().mean()
    # uniform over the union: P(low side) = 0.9 / (0.9 + 0.95)
    assert abs(low - 0.9 / 1.85) < 0.015 and abs(high - 0.95 / 1.85) < 0.015
    # uniform within each side: quartiles of the low side sit at the expected places
    lo = s[s < 1]
    assert abs(torch.quantile(lo, 0.5) - (0.05 + 0.9 / 2)) < 0.02


def test_sampler_rejects_empty_ranges():
    with pytest.raises(ValueError):
        ScaleSampler(0.97, 2.0, 0.05).sample(1, torch.Generator())  # low side negative length
    with pytest.raises(ValueError):
        ScaleSampler(0.0, 2.0, 0.05)  # w(s) = 1/s would divide by zero


def test_sampler_is_seeded():
    a = ScaleSampler().sample(5, torch.Generator().manual_seed(3))
    b = ScaleSampler().sample(5, torch.Generator().manual_seed(3))
    assert a == b


def _toy(kind):
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    w0 = model.weight.detach().clone()
    update = ScaledUpdate.full(model)
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight) * 0.5)  # W_t = W0 + ΔW
    return model, w0, update


@pytest.mark.parametrize("weight", sorted(SCALE_WEIGHTS))
def test_gradient_matches_hand_computation(weight):
    model, w0, update = _toy("full")
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    s, lam = 0.3, 0.7
    objective = Trap2Objective(lam, weight=weight, fixed_scales=[s])
    objective.backward(model, update, mse_loss, (x, y))
    # L(W) = mean((xWᵀ − y)²) → dL/dW = 2/(N·O) (xWᵀ − y)ᵀ x; the scaled pass adds a chain factor s.
    n = y.numel()
    W = model.weight.detach()
    grad_nominal = 2 / n * (x @ W.T - y).T @ x
    Ws = w0 + s * (W - w0)
    grad_scaled = 2 / n * (x @ Ws.T - y).T @ x * s
    expected = grad_nominal - lam * SCALE_WEIGHTS[weight](s) * grad_scaled
    assert torch.allclose(model.weight.grad, expected, atol=1e-6)


def test_off_loss_cap_stops_only_the_examples_broken_past_it():
    model, w0, update = _toy("full")
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    s, lam, cap = 1.8, 0.5, 1.0

    def per_example_mse(forward, batch):
        inputs, targets = batch
        return ((forward(inputs) - targets) ** 2).mean(1)

    Trap2Objective(lam, fixed_scales=[s], off_loss_cap=cap).backward(model, update, per_example_mse, (x, y))
    W = model.weight.detach()
    Ws = w0 + s * (W - w0)
    off = ((x @ Ws.T - y) ** 2).mean(1)
    assert (off > cap).any() and (off < cap).any()  # the case tested: some examples past the cap, some not
    live = off < cap  # d/dW of mean_i min(L_i, cap): only examples below the cap contribute
    grad_nominal = 2 / y.numel() * (x @ W.T - y).T @ x
    grad_off = 2 / y.numel() * ((x @ Ws.T - y) * live[:, None]).T @ x * s
    assert torch.allclose(model.weight.grad, grad_nominal - lam / s * grad_off, atol=1e-6)
    with pytest.raises(ValueError, match="off_loss_cap"):
        Trap2Objective(lam, off_loss_cap=0.0)


def test_lambda_zero_is_plain_gradient():
    model, _, update = _toy("full")
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    Trap2Objective(0.0).backward(model, update, mse_loss, (x, y))
    g = model.weight.grad.clone()
    model.weight.grad = None
    mse_loss(model, (x, y)).mean().backward()
    assert torch.equal(g, model.weight.grad)


def test_multiple_samples_average():
    model, _, update = _toy("full")
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    Trap2Objective(0.5, fixed_scales=[0.2, 1.5]).backward(model, update, mse_loss, (x, y))
    g_two = model.weight.grad.clone()
    parts = []
    for s in (0.2, 1.5):
        model.weight.grad = None
        Trap2Objective(0.5, fixed_scales=[s]).backward(model, update, mse_loss, (x, y))
        parts.append(model.weight.grad.clone())
    model.weight.grad = None
    mse_loss(model, (x, y)).mean().backward()
    nominal = model.weight.grad
    assert torch.allclose(g_two, nominal + ((parts[0] - nominal) + (parts[1] - nominal)) / 2, atol=1e-6)


def test_both_passes_share_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    update = ScaledUpdate.full(model)

    def loss(forward, batch):
        return forward(batch).pow(2).mean(-1)

    masks = []
    hook = model[1].register_forward_hook(lambda m, i, o: masks.append((o == 0)))
    Trap2Objective(1.0, fixed_scales=[1.0]).backward(model, update, loss, torch.randn(8, 4))
    hook.remove()
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("scales", [[0.5], [0.3, 1.7]])
def test_replayed_dropout_masks_give_the_same_bits_as_redrawn_ones(scales):
    """Reusing the nominal pass's masks (drawn once) must change nothing: the same gradient bits,
    and the global RNG stream continues where redrawing would have left it."""
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.3), nn.GELU(), nn.Linear(32, 32), nn.Dropout(0.1),
                              nn.Linear(32, 2))
        return model, ScaledUpdate.full(model)

    def loss(forward, batch):
        return forward(batch).pow(2).sum(-1)

    batch = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    grads, next_draws = [], []
    for replay in (False, True):
        model, update = make()
        objective = Trap2Objective(0.4, fixed_scales=scales)
        if replay:
            objective.replay_dropout(model)
            assert len(objective.dropout_replay.modules) == 2
        torch.manual_seed(5)
        for _ in range(2):  # the second step must draw fresh masks in both
            objective.backward(model, update, loss, batch)
        grads.append([p.grad.clone() for p in model.parameters()])
        next_draws.append(torch.rand(4))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(*next_draws)


def test_scale_one_reproduces_plain_forward_and_lora_scaling_is_exact():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    update = ScaledUpdate.lora(model)
    x = torch.randn(3, 6)
    layer = model.base_model.model[0]
    W0, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = B @ A * (4 / 2)
    plain = model(x)
    for s in (1.0, 0.5, 0.125, 1.7):
        with update.rescaled(model, s):
            out = model(x)
        assert torch.allclose(out, x @ (W0 + s * delta).T + layer.base_layer.bias, atol=1e-5)
    with update.rescaled(model, 1.0):
        assert torch.equal(model(x), plain)
    assert torch.equal(model(x), plain)  # the swap is undone on exit
    assert all(isinstance(p, nn.Parameter) for p in update.params.values())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradient_checkpointing_recomputes_with_the_rescaled_weights(kind):
    """Checkpointed layers recompute during backward; the off-nominal gradient must still be exact."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=16, attention_dropout=0.0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = CLIPVisionModelWithProjection(config)
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))
            update = ScaledUpdate.lora(model)
        else:
            update = ScaledUpdate.full(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        Trap2Objective(0.5, fixed_scales=[0.3]).backward(
            model, update, lambda m, b: m(pixel_values=b).image_embeds.pow(2).sum(-1), x)
        grads.append({n: p.grad.clone() for n, p in update.params.items()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_full_scaling_is_exact():
    model, w0, update = _toy("full")
    W = model.weight.detach().clone()
    for s in (0.0, 0.5, 2.0):
        assert torch.allclose(update.overrides(s)["weight"], w0 + s * (W - w0))
    with update.set_scale(0.25):
        assert torch.allclose(model.weight, w0 + 0.25 * (W - w0))
    assert torch.equal(model.weight, W)  # restored on exit


def test_weights():
    assert SCALE_WEIGHTS["inv"](0.25) == 4 and SCALE_WEIGHTS["inv_sqrt"](0.25) == 2 and SCALE_WEIGHTS["none"](9) == 1
    with pytest.raises(ValueError):
        Trap2Objective(0.1, weight="square")
    assert math.isclose(SCALE_WEIGHTS["inv_sqrt"](2.0), 2 ** -0.5)


def test_a_loss_that_is_not_per_example_is_refused():
    """The objective owns the reduction and the cap; a pre-reduced loss would make the cap act on a batch."""
    model, _, update = _toy("full")
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match="one loss per example"):
        Trap2Objective(0.5, fixed_scales=[0.5]).backward(model, update, lambda f, b: mse_loss(f, b).mean(), (x, y))


@pytest.mark.parametrize("lambda_ramp_steps, step, share", [(0, 0, 1.0), (4, 0, 0.25), (4, 2, 0.75), (4, 3, 1.0), (4, 50, 1.0)])
def test_decoy_pass_adds_the_gradient_beside_a_decoy_and_the_ramp_scales_both_traps(lambda_ramp_steps, step, share):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2, bias=False))
    w0 = net[0].weight.detach().clone()
    update = ScaledUpdate.full(net)
    with torch.no_grad():
        net[0].weight.add_(torch.randn(2, 3) * 0.5)
    x, y, D = torch.randn(5, 3), torch.randn(5, 2), torch.randn(2, 3)
    s, lam, lam_d, m = 0.3, 0.7, 0.4, 0.6
    objective = Trap2Objective(lam, weight="none", fixed_scales=[s], lambda_ramp_steps=lambda_ramp_steps)
    objective.attach_decoys(DecoyPartners(net, [{"0.weight": D}], [m, m]), lam_d)
    metrics = objective.backward(net, update, mse_loss, (x, y), step=step)
    W = net[0].weight.detach()

    def grad(V):  # d/dV of mean((xVᵀ − y)²)
        return 2 / y.numel() * (x @ V.T - y).T @ x

    def loss(V):
        return float(((x @ V.T - y) ** 2).mean())

    expected = grad(W) - share * (lam * s * grad(w0 + s * (W - w0)) + lam_d * grad(W + m * D))
    assert torch.allclose(net[0].weight.grad, expected, atol=1e-6)
    assert metrics["loss_decoy"] == pytest.approx(loss(W + m * D), rel=1e-6)
    assert metrics["objective"] == pytest.approx(
        loss(W) - share * (lam * loss(w0 + s * (W - w0)) + lam_d * loss(W + m * D)), rel=1e-5)
    assert torch.equal(net(x), x @ W.T)  # the decoy left with its pass


def test_a_negative_ramp_is_refused():
    with pytest.raises(ValueError, match="lambda_ramp_steps"):
        Trap2Objective(0.5, lambda_ramp_steps=-1)


def test_decoys_are_added_beside_a_peft_adapter_exactly_and_drawn_from_the_objective_stream():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.norm = nn.Linear(4, 6), nn.Linear(6, 2), nn.LayerNorm(2)

        def forward(self, x):
            return self.norm(self.fc2(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    plain = Tiny()
    w0 = {k: v.clone() for k, v in plain.state_dict().items()}
    net = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    net.base_model.model.load_state_dict(w0, strict=False)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    net.eval()
    D1, D2 = torch.randn(6, 4), torch.randn(2, 6)
    decoys = DecoyPartners(net, [{"fc1.weight": D1, "fc2.weight": D2}, {"fc2.weight": D2}], [0.5, 0.5])
    x = torch.randn(3, 4)
    before = net(x)
    with torch.no_grad():
        for layer in ("fc1", "fc2"):
            lora = net.base_model.model.get_submodule(layer)
            delta = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
            plain.get_submodule(layer).weight.add_(delta + 0.5 * (D1 if layer == "fc1" else D2))
    with decoys.added(decoys.decoys[0], 0.5):
        assert torch.allclose(net(x), plain(x), atol=1e-6)
    assert torch.equal(net(x), before)

    three = DecoyPartners(net, [{"fc1.weight": D1 * k} for k in (1, 2, 3)], [0.3, 0.7])
    draws = [three.draw(torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(draws[0][0][0][1], draws[1][0][0][1]) and draws[0][1] == draws[1][1]  # a resumed run draws the same
    assert 0.3 <= draws[0][1] <= 0.7
    for bad, words in (({"fc3.weight": D1}, "names no layer"), ({"fc1.weight": D2}, "shape"),
                       ({"norm.weight": torch.ones(2)}, "linear layers only"),
                       ({"fc1.weight": D1 * float("nan")}, "non-finite")):
        with pytest.raises(ValueError, match=words):
            DecoyPartners(net, [bad], [0.5, 0.5])
    with pytest.raises(ValueError, match="lambda_reg > 0"):
        Trap2Objective(0.0).attach_decoys(decoys, 1.0)
    random = RandomDecoys(net, {"fc1.weight": torch.eye(4, dtype=torch.float64)}, {"fc1.weight": 1.0}, [0.5, 0.5], 2)
    assert random.layers[0][0] is net.base_model.model.fc1  # the LoRA wrapper, as for DecoyPartners


def test_random_decoys_read_the_strongest_input_directions_at_the_reference_norm_fresh_each_draw():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 4))
    # layer 0's inputs are strongest along axes 3 and 1; layer 2's along a rotated pair
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    grams = {"0.weight": torch.diag(torch.tensor([0.1, 5.0, 0.2, 9.0, 0.3], dtype=torch.float64)),
             "2.weight": q @ torch.diag(torch.tensor([4.0, 0.01, 2.0], dtype=torch.float64)) @ q.T}
    norms = {"0.weight": 2.5, "2.weight": 0.7}
    decoys = RandomDecoys(net, grams, norms, [0.4, 0.8], directions=2)
    first, m = decoys.draw(torch.Generator().manual_seed(3))
    again, m_again = decoys.draw(torch.Generator().manual_seed(3))
    second, _ = decoys.draw(torch.Generator().manual_seed(4))
    assert 0.4 <= m <= 0.8 and m == m_again
    for (module, d), (_, d_again), (_, d_other), name in zip(first, again, second, ("0.weight", "2.weight")):
        assert module is net[int(name[0])] and d.shape == module.weight.shape
        assert torch.equal(d, d_again) and not torch.allclose(d, d_other)  # seeded, and fresh per draw
        assert float(d.norm()) == pytest.approx(norms[name], rel=1e-6)
    assert torch.all(first[0][1][:, [0, 2, 4]] == 0)  # layer 0: only the two strongest input axes are read
    strong = q[:, [0, 2]].float()
    assert torch.allclose(first[1][1] - first[1][1] @ strong @ strong.T, torch.zeros(4, 3), atol=1e-6)
    for bad_grams, bad_norms, words in (({"0.weight": grams["0.weight"]}, norms, "same layers"),
                                        (grams, {**norms, "2.weight": -1.0}, "finite and >= 0"),
                                        (grams, {**norms, "2.weight": float("inf")}, "finite and >= 0")):
        with pytest.raises(ValueError, match=words):
            RandomDecoys(net, bad_grams, bad_norms, [0.4, 0.8], directions=2)
