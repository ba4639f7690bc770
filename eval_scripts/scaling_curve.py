"""Accuracy and loss of saved updates applied at scale s (W0 + s·ΔW): the paper's teaser figure.

    python -m eval_scripts.scaling_curve --updates runs/.../gtsrb-plain runs/.../gtsrb-trap2
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from models.options import option, parse_config
from models.runtime import pin_threads, resolve_device, run_cli
from models.updates import load_update
from models.vision import evaluate


@dataclass
class CurveConfig:
    updates: list[str] | None = option(None, "update folders to evaluate")
    s_min: float = option(0.0, "smallest scale s")
    s_max: float = option(3.0, "largest scale s")
    s_step: float = option(0.05, "step between scales")
    split: str = option("test", "val or test")
    output: str = option("results/scaling_curve", "path without extension of the .csv and .png")
    eval_batch_size: int = option(512, "batch size of evaluation")
    data_root: str | None = option(None, "vision8: where the datasets lie here (default: as each update was trained)")
    base_options: dict | None = option(None, "the base's options; default: the updates' recorded offline recipe")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def scales(self) -> list[float]:
        n = int(round((self.s_max - self.s_min) / self.s_step)) + 1
        return [round(self.s_min + i * self.s_step, 6) for i in range(n)]


def scaling_curve(cfg: CurveConfig) -> list[dict]:
    from eval_scripts.evaluators import VisionEvaluator

    if not cfg.updates:
        raise ValueError("--updates needs at least one update folder")
    updates = [load_update(p) for p in cfg.updates]
    device = resolve_device(cfg.device)
    pin_threads(device)
    evaluator = VisionEvaluator(updates, device, cfg.eval_batch_size, data_root=cfg.data_root,
                               base_options=cfg.base_options)
    rows = []
    for u in updates:
        deltas = {n: u.delta(n) for n in u.names()}
        t = evaluator.tasks[u.task]
        for s in cfg.scales():
            evaluator.apply(deltas, s)
            r = evaluate(t.classifier, t.task, cfg.split, cfg.eval_batch_size, evaluator.device)
            rows.append({"update": str(u.path), "task": u.task, "protected": u.protected, "kind": u.kind,
                         "scale": s, "accuracy": r["accuracy"], "loss": r["loss"]})
    evaluator.apply(None)
    return rows


def write_curve(rows: list[dict], output: str | Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = Path(f"{out}.csv"), Path(f"{out}.png")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for path in dict.fromkeys(r["update"] for r in rows):
        pts = [r for r in rows if r["update"] == path]
        label = f"{pts[0]['task']} {pts[0]['kind']} {'Trap²' if pts[0]['protected'] else 'plain'}"
        style = "-" if pts[0]["protected"] else "--"
        ax_acc.plot([r["scale"] for r in pts], [100 * r["accuracy"] for r in pts], style, label=label)
        ax_loss.plot([r["scale"] for r in pts], [r["loss"] for r in pts], style, label=label)
    for ax, name in ((ax_acc, "accuracy (%)"), (ax_loss, "cross-entropy")):
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set(xlabel="update scale s  (W0 + s·ΔW)", ylabel=name)
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def run_curve(cfg: CurveConfig) -> tuple[Path, Path]:
    """The curves of the config's updates, written to its output (.csv and .png)."""
    return write_curve(scaling_curve(cfg), cfg.output)


def main(argv=None) -> None:
    cfg = parse_config(CurveConfig, argv, "Accuracy and loss of saved updates against their scale s.")
    csv_path, png_path = run_curve(cfg)
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    run_cli(main)
