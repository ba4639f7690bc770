"""The paper's command name: python -m training_scripts.8vision_training (defaults --peft lora --lambda_reg 0.0)."""
from training_scripts.__main__ import main

if __name__ == "__main__":
    main(defaults={"peft": "lora", "lambda_reg": 0.0})
