"""python -m eval_scripts --config configs/merge/....yaml [--merge_method ties --merge_space core] ..."""
from __future__ import annotations

from eval_scripts.linear_search import MergeConfig, run_merge_eval
from models.options import parse_config
from models.runtime import run_cli


def main(argv=None, defaults: dict | None = None) -> None:
    cfg = parse_config(MergeConfig, argv, "Merge a protected target update with unprotected others (and the "
                       "all-unprotected control), search the coefficient on validation, report test.", defaults)
    out = run_merge_eval(cfg)
    print(f"results written to {out}")


if __name__ == "__main__":
    run_cli(main)
