"""Learning-rate schedules (multipliers of the peak LR by step), for the trainers and the base pretraining."""
from __future__ import annotations

import math


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def linear_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


SCHEDULES = {"cosine": cosine_with_warmup, "linear": linear_with_warmup}


def warmup_times_cosine(step: int, warmup: int, total: int) -> float:
    """The base pretraining's schedule: a linear ramp multiplied into a cosine over all `total` steps."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
