"""A post-hoc defence (PaRaMS, Merge-Lock) applied to a finished update: the same function, other weights.

    python -m training_scripts.defend --update runs/offline/offline-vit/full/gtsrb-plain --defence merge_lock \
        --output runs/offline/offline-vit/full/gtsrb-merge_lock
"""
from __future__ import annotations

from dataclasses import dataclass

from models.defences import DEFENCES, DefenceOptions, defend_update
from models.options import option, parse_config
from models.runtime import run_cli


@dataclass
class DefendConfig(DefenceOptions):
    update: str = option("", "the release folder to defend (a full update, or a LoRA adapter for PaRaMS)")
    defence: str = option("params", "params (PaRaMS) or merge_lock (Merge-Lock)")
    output: str = option("", "the folder to write the defended release to")
    seed: int = option(0, "seed of the defence's random scales and matrices")
    base_options: dict | None = option(None, "the base's options, e.g. {pretrained: /local/folder}")

    def __post_init__(self) -> None:
        DEFENCES.lookup(self.defence)
        if not self.update or not self.output:
            raise ValueError("give --update (the release to defend) and --output (the folder to write)")


def main(argv=None) -> None:
    cfg = parse_config(DefendConfig, argv, __doc__.split("\n")[0])
    options = DefenceOptions(cfg.strength, cfg.rank_per_head)
    print(f"wrote {defend_update(cfg.update, cfg.defence, cfg.output, options, cfg.seed, cfg.base_options)}")


if __name__ == "__main__":
    run_cli(main)
