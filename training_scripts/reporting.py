"""--report_to: training metrics mirrored to TensorBoard or Weights & Biases besides metrics.jsonl.
Neither library is imported unless chosen; a missing one is named with its install command."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from models.options import check_choice

REPORTERS = ("none", "tensorboard", "wandb")
Reporter = Callable[[dict], None]  # one metrics record (with its step)


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def make_reporter(report_to: str, out_dir: Path, config: dict) -> Reporter | None:
    check_choice("report_to", report_to, REPORTERS)
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

        def report(record: dict) -> None:
            for name, value in _scalars(record).items():
                writer.add_scalar(name, value, record["step"])
            writer.flush()
        return report
    if report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise ValueError("--report_to wandb needs the wandb package: pip install wandb") from None
        run = wandb.init(project="trap2", name=out_dir.name, dir=str(out_dir), config=config)
        return lambda record: run.log(_scalars(record), step=record["step"])
