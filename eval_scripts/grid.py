"""Every merge method × merge space for one merge config (the paper's post-merging tables).

    python -m eval_scripts.grid --config configs/merge/offline_vit_lora_gtsrb.yaml
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eval_scripts.linear_search import MergeConfig, run_merge_eval
from task_merger import MERGE_SPACES, get_merge_method
from training_scripts.config import parse_config

PAPER_METHODS = ["tv", "ties", "dare_ties", "tsv", "cart"]


@dataclass
class GridConfig(MergeConfig):
    methods: list[str] | None = None  # default: the paper's five
    spaces: list[str] | None = None  # default: full, knots, core
    results_root: str | None = None  # default: as MergeConfig (results/<suite>/<model>/<kind>/<target>)


def main(argv=None) -> None:
    cfg = parse_config(GridConfig, argv, __doc__)
    methods, spaces = cfg.methods or PAPER_METHODS, cfg.spaces or list(MERGE_SPACES)
    for m in methods:
        get_merge_method(m)
    merge_fields = {f.name for f in dataclasses.fields(MergeConfig)}
    for space in spaces:
        for method in methods:
            values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in merge_fields}
            values.update(merge_method=method, merge_space=space)
            if cfg.results_root:
                values["output_dir"] = f"{cfg.results_root}/{method}-{space}"
            print(f"{method} / {space}: {run_merge_eval(MergeConfig(**values))}", flush=True)


if __name__ == "__main__":
    main()
