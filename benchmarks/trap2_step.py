"""Time of one Trap² training step against one plain step, same model and batch, measured in one run.

    python -m benchmarks.trap2_step [--peft lora|full] [--steps 30]

Two forward/backward passes are the floor, so the target ratio is <= 2.1.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from models.updates import ScaledUpdate
from training_scripts.objective import Trap2Objective


def build(peft: str, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    net = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=128,
                                                         intermediate_size=512, num_hidden_layers=4,
                                                         num_attention_heads=4, projection_dim=64))
    if peft == "lora":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        return net, ScaledUpdate.lora(net)
    return net, ScaledUpdate.full(net)


def time_steps(net, update, objective, batch, steps: int) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def loss_fn(forward, b):
        x, y = b
        return F.cross_entropy(forward(pixel_values=x).image_embeds, y, reduction="none")

    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        objective.backward(net, update, loss_fn, batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peft", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternate plain/Trap² rounds; medians are compared")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 64, (args.batch_size,), generator=g))
    plain_times, trap2_times = [], []
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        net, update = build(args.peft)
        plain_times.append(time_steps(net, update, Trap2Objective(0.0), batch, args.steps))
        net, update = build(args.peft)
        trap2_times.append(time_steps(net, update, Trap2Objective(0.01), batch, args.steps))
    plain, trap2 = sorted(plain_times)[len(plain_times) // 2], sorted(trap2_times)[len(trap2_times) // 2]
    print(f"{args.peft}: plain step {1000 * plain:.1f} ms, Trap² step {1000 * trap2:.1f} ms "
          f"(batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads)")
    print(f"trap2/plain step time ratio: {trap2 / plain:.3f}")


if __name__ == "__main__":
    main()
