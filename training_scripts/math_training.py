"""The paper's command name: python -m training_scripts.math_training --task gsm8k (unprotected LoRA, λ = 0)."""
from models.runtime import run_cli
from training_scripts.math import main

if __name__ == "__main__":
    run_cli(lambda: main(protected=False))
