"""Every merge method × merge space for one merge config (the paper's post-merging tables).

    python -m eval_scripts.grid --config configs/merge/offline_vit_lora_gtsrb.yaml [--jobs 2]

The pre-merge pass, shared by every cell, runs first; then the cells run `jobs` at a time, one
process each on one CPU thread (so the selected merges do not depend on the number of jobs). The
cells of a merge set share their evaluations (linear_search.EvaluationCache); a linear method's
cells outside full space run last, as their merges are the full-space cell's and cost no evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from eval_scripts.linear_search import MergeConfig, merge_settings, pre_merge, run_merge_eval, setup_merge
from models.options import option, parse_config
from models.runtime import default_jobs, run_cli, run_jobs
from models.updates import METADATA_FILE
from task_merger import MERGE_SPACES, get_merge_method

PAPER_METHODS = ["tv", "ties", "dare_ties", "tsv", "cart"]


@dataclass
class GridConfig(MergeConfig):
    methods: list[str] | None = option(None, "merge methods; default: the paper's five")
    spaces: list[str] | None = option(None, "merge spaces; default: full, knots, core")
    results_root: str | None = option(None, "default: as the merge command (results/<suite>/<model>/<kind>/<target>)")
    jobs: int | None = option(None, "cells evaluated at once (default: one per CPU core, 1 on a GPU)")


def grid_cells(cfg: GridConfig) -> list[MergeConfig]:
    methods, spaces = cfg.methods or PAPER_METHODS, cfg.spaces or list(MERGE_SPACES)
    for m in methods:
        get_merge_method(m)
    shared = merge_settings(cfg)
    paths = [*(cfg.protected or ()), *(cfg.control or ()), *(cfg.others or ())]
    spaces = usable_spaces(spaces, {update_kind(p) for p in paths})
    cells = []
    for space in spaces:
        for method in methods:
            values = {**shared, "merge_method": method, "merge_space": space}
            if cfg.results_root:
                values["output_dir"] = f"{cfg.results_root}/{method}-{space}"
            cells.append(MergeConfig(**values))
    return cells


def usable_spaces(spaces: list[str], kinds: set[str | None]) -> list[str]:
    """The spaces a merge of updates of these kinds (lora, full) can use: Core space needs LoRA factors."""
    if "core" in spaces and "full" in kinds:
        note_core_skipped()
        return [s for s in spaces if s != "core"]
    return spaces


@functools.cache
def note_core_skipped() -> None:
    """Said once a process: a command builds many grids of the same full updates."""
    print("note: Core space needs LoRA factors; these are full updates, so its cells are skipped")


def update_kind(folder: str) -> str | None:
    """lora or full, as the update's metadata says (None if it cannot be read: loading will say why)."""
    try:
        return json.loads((Path(folder) / METADATA_FILE).read_text()).get("kind")
    except (OSError, ValueError):
        return None


def _pre_merge(cell: MergeConfig) -> None:
    pre_merge(setup_merge(cell), cell)


def computed_in_full_space(cell: MergeConfig) -> bool:
    """A linear method (Task Arithmetic) merges to the same ΔW in every space: its knots/core cells read the
    full-space cell's evaluations."""
    return get_merge_method(cell.merge_method).linear and not cell.isotropize and cell.merge_space != "full"


def _call(job: tuple[Callable, object]) -> object:
    work, argument = job
    return work(argument)


def run_cells(cells: list[MergeConfig], jobs: int, side_jobs: Sequence[tuple[Callable, object]] = ()) -> None:
    """Evaluates the cells, `jobs` at a time, in the given order except that the cells computed in full space
    go last. The pre-merge pass of each distinct set of updates and folder comes first (also `jobs` at a
    time), so the cells that share it only read it. `side_jobs` ((module-level function, argument) pairs)
    share the cells' processes, first."""
    cells = sorted(cells, key=computed_in_full_space)
    firsts = {}
    for cell in cells:
        folder = str(Path(cell.output_dir).parent) if cell.output_dir else None
        key = (cell.target, tuple(cell.protected or ()), tuple(cell.control or ()), tuple(cell.others or ()),
               tuple(cell.protected_others or ()), folder)
        firsts.setdefault(key, dataclasses.replace(cell, progress=False))
    run_jobs(_pre_merge, list(firsts.values()), jobs, f"pre-merge passes of {len(firsts)} merge sets",
             lambda cell: f"{cell.target} + {len(cell.others or ())} others")
    if jobs > 1:
        cells = [dataclasses.replace(cell, progress=False) for cell in cells]
    work = [*side_jobs, *((run_merge_eval, cell) for cell in cells)]
    run_jobs(_call, work, jobs, f"evaluating {len(cells)} merges" + (f" (and {len(side_jobs)} more jobs)" if side_jobs
                                                                     else ""),
             lambda job: (f"{job[1].target} {job[1].merge_method}/{job[1].merge_space}"
                          if isinstance(job[1], MergeConfig) else job[0].__name__))


def main(argv=None) -> None:
    cfg = parse_config(GridConfig, argv, __doc__)
    run_cells(grid_cells(cfg), cfg.jobs or default_jobs(cfg.device))


if __name__ == "__main__":
    run_cli(main)
