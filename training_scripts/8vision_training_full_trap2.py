"""The paper's command name: python -m training_scripts.8vision_training_full_trap2 (full fine-tuning by default, Trap²-protected: λ from --lambda_reg or the YAML, else the release's 0.01)."""
from models.runtime import run_cli
from training_scripts.__main__ import main

if __name__ == "__main__":
    run_cli(lambda: main(defaults={"peft": "full"}, protected=True))
