"""What linear layers read: the second moment of their inputs, for data-aware merging and random decoys."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def layer_input_grams(net: nn.Module, weight_names: list[str], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """XᵀX / rows (float64, on the CPU) of the inputs X of every linear layer of `net` whose weight is in
    `weight_names` (every token a row), over what `run()` feeds through the network."""
    modules = dict(net.named_modules())
    sums: dict[str, list] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc = sums.setdefault(name, [0.0, 0])
            acc[0], acc[1] = acc[0] + x.T @ x, acc[1] + x.shape[0]
        return hook

    for name in weight_names:
        module = modules.get(name.rsplit(".", 1)[0])
        if name.endswith(".weight") and isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {name: (total / rows).cpu() for name, (total, rows) in sums.items()}
