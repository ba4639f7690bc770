"""The paper's command name: python -m training_scripts.8vision_training (LoRA, unprotected: λ = 0)."""
from models.runtime import run_cli
from training_scripts.__main__ import main

if __name__ == "__main__":
    run_cli(lambda: main(protected=False))
