"""A release as a complete model folder, or a complete fine-tuned model as our full update.

    python -m training_scripts.export --update runs/.../gtsrb-trap2 --output exported/gtsrb-trap2
    python -m training_scripts.export --model exported/my-finetune --like runs/.../gtsrb-plain --output runs/imported
"""
from __future__ import annotations

from dataclasses import dataclass

from models.export import export_model, import_model
from models.options import option, parse_config
from models.runtime import run_cli


@dataclass
class ExportConfig:
    update: str | None = option(None, "export: the release folder to write as a complete model")
    model: str | None = option(None, "import: a complete model folder (config.json + model.safetensors)")
    like: str | None = option(None, "import: a release of the same base whose data settings the import takes")
    task: str | None = option(None, "import: the model's task (default: the --like release's)")
    lambda_reg: float = option(0.0, "import: the λ it was trained with, if known (0: recorded as unprotected)")
    base_options: dict | None = option(None, "the base's options, e.g. {pretrained: /local/folder}")
    output: str = option("", "the folder to write")

    def __post_init__(self) -> None:
        if (self.update is None) == (self.model is None):
            raise ValueError("give exactly one of --update (export a release) or --model with --like (import a model)")
        if self.model is not None and self.like is None:
            raise ValueError("--model needs --like: a release of the same base, for its data settings")
        if not self.output:
            raise ValueError("--output (the folder to write) is required")


def main(argv=None) -> None:
    cfg = parse_config(ExportConfig, argv, __doc__.split("\n")[0])
    if cfg.update is not None:
        out = export_model(cfg.update, cfg.output, cfg.base_options)
    else:
        out = import_model(cfg.model, cfg.like, cfg.output, cfg.task, cfg.lambda_reg, cfg.base_options)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
