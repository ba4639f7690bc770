"""The paper's command name: python -m training_scripts.math_training_trap2 --task gsm8k (Trap²-protected LoRA: λ from
--lambda_reg or the YAML, else the release's 0.01)."""
from models.runtime import run_cli
from training_scripts.math import main

if __name__ == "__main__":
    run_cli(lambda: main(protected=True))
