"""Collect results into the paper's layouts, as Markdown and LaTeX.

    python -m eval_scripts.tables [--results results] [--output results/tables]

- Standalone table (paper Table 1): mean test accuracy over the suite's tasks of the zero-shot
  base, the unprotected fine-tune and the Trap²-protected update (from training_scripts.suite).
- Claims (eval_scripts.reproduce's claims.json): each claim of the issue with its numbers as mean ± std
  over the seeds, whether it holds and what it misses.
- Post-merging tables: per target, method × space, the target's test accuracy after the attacker's
  best merge, protected vs the all-unprotected control, and the mean over tasks.
- Few-shot recovery (eval_scripts.recovery): the target's test accuracy after an attacker fine-tunes
  each selected merge on k labelled examples.
- `<output>-tradeoff.png`: each standalone setting's cost of protection at s = 1 against what is
  left at s = 0.5 above the zero-shot base, with the foundation issue's target box
  (cost ≤ 1.5 points, at most 5 points above the base).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from eval_scripts.grid import PAPER_METHODS
from models.options import option, parse_config
from models.runtime import run_cli
from task_merger import MERGE_SPACES
from training_scripts.objective import ScaleSampler


@dataclass
class TablesConfig:
    results: str = option("results", "folder searched for standalone and merge results")
    output: str | None = option(None, "path without extension; default: <results>/tables(.md|.tex)")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _off_scales(cfg: dict) -> str:
    """The sampler's support; tables written before it was recorded used the sampler's defaults."""
    return str(ScaleSampler(cfg.get("rand_alpha_min", ScaleSampler.s_min), cfg.get("rand_alpha_max", ScaleSampler.s_max),
                            cfg.get("band", ScaleSampler.delta)))


def standalone_rows(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.glob("**/standalone*.json")):
        data = json.loads(path.read_text())
        cfg, mean = data["config"], data["rows"][-1]
        weight = cfg.get("rand_alpha_weight", "inv") + (f", cap {cfg['off_loss_cap']:g}" if cfg.get("off_loss_cap") else "")
        rows.append({"backbone": cfg["model"], "update": cfg["peft"], "λ": str(cfg["lambda_reg"]),
                     "w(s)": weight, "scales/step": cfg.get("scale_samples", 1), "off scales": _off_scales(cfg),
                     "lr": "default" if cfg["lr"] is None else f"{cfg['lr']:g}", "steps": cfg["max_steps"], "eval every": cfg["eval_freq"],
                     "tasks": len(data["rows"]) - 1, "seeds": len(cfg.get("seeds") or [cfg["seed"]]),
                     "zero-shot": mean["zero_shot"], "fine-tuned": mean["plain@1"], "Trap²": mean["trap2@1"],
                     "cost": f"{100 * (mean['plain@1'] - mean['trap2@1']):.2f}",  # 2 decimals: never rounded past a target
                     "fine-tuned @ s=0.5": mean["plain@0.5"], "Trap² @ s=0.5": mean["trap2@0.5"],
                     "Trap² @ s=1/8": mean["trap2@0.125"]})
    return rows


def merge_rows(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.glob("**/summary.json")):
        data = json.loads(path.read_text())
        cfg, sc = data["config"], data["scenarios"]
        if "protected" not in sc or "control" not in sc:
            continue
        target = cfg["target"]
        p, c = sc["protected"], sc["control"]
        zero = data["pre_merge"]["zero_shot"]["test"][target]
        row = {"group": str(path.parent.relative_to(root).parent), "method": cfg["merge_method"],
               "space": cfg["merge_space"], "zero-shot target": zero,
               "target protected": p["test"][target], "target control": c["test"][target],
               "mean protected": sum(p["test"].values()) / len(p["test"]),
               "mean control": sum(c["test"].values()) / len(c["test"])}
        if "adaptive" in p:
            row["target protected (adaptive)"] = p["adaptive"]["test"][target]
        rows.append(row)
    order = {m: i for i, m in enumerate(PAPER_METHODS)}
    spaces = {s: i for i, s in enumerate(MERGE_SPACES)}
    rows.sort(key=lambda r: (r["group"], spaces.get(r["space"], 9), order.get(r["method"], 9), r["method"]))
    return rows


def _spread(numbers: dict | None) -> str:
    """A claim's number (already in %) as mean ± std over its seeds."""
    return "" if numbers is None else f"{numbers['mean']:.1f} ± {numbers['std']:.1f}"


def _nearest_bar(margins: dict | None) -> str:
    """A claim's condition nearest its bar: its distance (negative: missed) ± its standard error over the seeds."""
    if not margins:  # files older than `margins`
        return ""
    text, m = min(margins.items(), key=lambda item: item[1]["margin"])
    words = text.split(" ")
    compared = next(i for i, w in enumerate(words) if w in ("≤", "≥", "<"))
    return f"{' '.join(words[:compared + 2])}: {m['margin']:+.2f} ± {m['se']:.2f}"


def claims_tables(root: Path) -> list[tuple[str, list[dict]]]:
    """Each test-split claims*.json (eval_scripts.reproduce) under `root` as (title, rows): per claim its
    numbers with their seed spread, whether it holds, and the conditions it misses. Validation files
    (claims-val.json, for choosing settings) are left out: these tables report test."""
    tables = []
    for path in sorted(root.glob("**/claims*.json")):
        data = json.loads(path.read_text())
        if data.get("split", "test") != "test":
            continue
        rows = []
        for c in data["claims"]:
            cell, _, _ = c["claim"].partition(":")
            rows.append({"claim": cell, "cost": _spread(c.get("cost")), "zero-shot": _spread(c.get("zero_shot")),
                         "protected": _spread(c.get("protected")), "control": _spread(c.get("control")),
                         "control keeps": f"{c['control_gain_kept']:.2%}" if "control_gain_kept" in c else "",
                         "task mean protected": _spread(c.get("protected_task_mean")),
                         "task mean zero-shot": _spread(c.get("zero_shot_task_mean")),
                         "holds": "yes" if c["holds"] else "NO",
                         "unmet": "; ".join(c.get("unmet", [])),  # files older than `unmet` name none
                         "nearest bar": _nearest_bar(c.get("margins"))})
        seeds = data.get("seeds") or []
        tables.append((f"Claims: {path.relative_to(root)} ({data['holds']} of {data['of']} hold; seeds "
                       f"{', '.join(map(str, seeds))}; target accuracy in %, mean ± std over the seeds)", rows))
    return tables


def _markdown(rows: list[dict], title: str) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_pct(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
    return out + [""]


# characters of the tables' text that LaTeX needs written otherwise
LATEX_SYMBOLS = {"_": r"\_", "%": r"\%", "²": r"$^2$", "λ": r"$\lambda$", "∪": r"$\cup$", "±": r"$\pm$",
                 "≤": r"$\leq$", "≥": r"$\geq$", "−": r"$-$"}


def _latex(rows: list[dict], title: str) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    esc = lambda s: "".join(LATEX_SYMBOLS.get(ch, ch) for ch in str(s))
    out = [f"% {title}", r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
           " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for r in rows:
        out.append(" & ".join(_pct(r[c]) if isinstance(r.get(c), float) else esc(r.get(c, "")) for c in cols) + r" \\")
    return out + [r"\bottomrule", r"\end{tabular}", ""]


def build_tables(cfg: TablesConfig) -> tuple[Path, Path]:
    root = Path(cfg.results)
    standalone, merged = standalone_rows(root), merge_rows(root)
    if not standalone and not merged:
        raise FileNotFoundError(f"no standalone*.json or summary.json under {root}: run training_scripts.suite "
                                f"and eval_scripts first")
    md = ["# Results", "", "Accuracies in %, test split. Post-merging: the target is protected by Trap², or by the "
                           "post-hoc defence a group's name names (-params: PaRaMS, -merge_lock: Merge-Lock); in "
                           "groups ending in -realigned the attacker realigned every update to the base first."]
    tex = []
    md += _markdown(standalone, "Standalone mean accuracy (Table 1 layout)")
    tex += _latex(standalone, "Standalone mean accuracy")
    for title, rows in claims_tables(root):
        md += _markdown(rows, title)
        tex += _latex(rows, title)
    for group in dict.fromkeys(r["group"] for r in merged):
        rows = [{k: v for k, v in r.items() if k != "group"} for r in merged if r["group"] == group]
        for r in rows:
            r["protected lower?"] = "yes" if r["target protected"] < r["target control"] else "NO"
        md += _markdown(rows, f"Post-merging: {group}")
        tex += _latex(rows, f"Post-merging: {group}")
    for path in sorted(root.glob("**/recovery.csv")):
        rows = [{k: (float(v) / 100 if k.startswith(("merged", "recovered")) else v) for k, v in r.items()}
                for r in csv.DictReader(open(path))]
        title = f"Few-shot recovery: {path.parent.relative_to(root)}"
        md += _markdown(rows, title)
        tex += _latex(rows, title)
    out = Path(cfg.output or root / "tables")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text("\n".join(md) + "\n")
    Path(f"{out}.tex").write_text("\n".join(tex) + "\n")
    if standalone:
        _tradeoff_plot(standalone, Path(f"{out}-tradeoff.png"))
    return Path(f"{out}.md"), Path(f"{out}.tex")


# The foundation issue's standalone target: cost ≤ 1.5 points, at most 5 points above the base at s = 0.5.
TARGET_COST, TARGET_ABOVE_BASE = 1.5, 5.0


def _tradeoff_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups = dict.fromkeys((r["backbone"], r["update"]) for r in rows)
    all_x, all_y = [], []
    for (backbone, update), marker in zip(groups, "osD^v<>"):
        mine = [r for r in rows if (r["backbone"], r["update"]) == (backbone, update)]
        xs = [100 * (r["fine-tuned"] - r["Trap²"]) for r in mine]
        ys = [100 * (r["Trap² @ s=0.5"] - r["zero-shot"]) for r in mine]
        all_x += xs
        all_y += ys
        ax.scatter(xs, ys, marker=marker, label=f"{backbone} {update}", zorder=3)
        usual = {k: max((r[k] for r in mine), key=[r[k] for r in mine].count) for k in ("off scales", "lr", "steps", "eval every", "tasks")}
        for r, x, y in zip(mine, xs, ys):
            label = f"λ{r['λ']} {r['w(s)']} K{r['scales/step']}"
            label += "".join(f" {k} {r[k]}" for k in usual if r[k] != usual[k])  # only what sets it apart
            label += f" ×{r['seeds']} seeds" if r["seeds"] > 1 else ""
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    xlim = (min(all_x + [0]) - 0.5, max(all_x + [TARGET_COST]) + 1.0)
    ylim = (min(all_y + [0]) - 3, max(all_y + [TARGET_ABOVE_BASE]) + 3)
    ax.fill_between([xlim[0], TARGET_COST], ylim[0], TARGET_ABOVE_BASE, color="tab:green", alpha=0.12,
                    label="target", zorder=1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("cost at s = 1: fine-tuned − Trap² (points)")
    ax.set_ylabel("Trap² at s = 0.5 − zero-shot (points)")
    ax.set_title("Standalone trade-off of each Trap² setting (mean over the suite's tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    md, tex = build_tables(parse_config(TablesConfig, argv, __doc__))
    print(md.read_text())
    print(f"wrote {md} and {tex}")


if __name__ == "__main__":
    run_cli(main)
