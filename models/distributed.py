"""Data parallelism for the one training loop, under `torchrun` or `accelerate launch` unchanged.

Each process computes the Trap² gradient (both passes) on its own shard of the batch; the
gradients are then averaged over processes before clipping and the optimiser step, so every
process applies the identical update (DDP semantics). The update's parameters (LoRA factors) are
small, so one flat all-reduce per step costs little next to the two forward/backward passes.
The base weights stay frozen and replicated: an 8B model in bf16 fits one 80 GB GPU with LoRA.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> torch.device:
    """Joins the process group the launcher describes (WORLD_SIZE > 1); returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    atexit.register(_leave)  # a group left up at exit can abort the process in its teardown
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replaces each .grad by its mean over processes (a missing grad counts as zero)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Every process starts from rank 0's values."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
