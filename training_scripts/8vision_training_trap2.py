"""The paper's command name: python -m training_scripts.8vision_training_trap2 (LoRA, Trap²-protected: λ from --lambda_reg or the YAML, else the release's 0.01)."""
from models.runtime import run_cli
from training_scripts.__main__ import main

if __name__ == "__main__":
    run_cli(lambda: main(protected=True))
