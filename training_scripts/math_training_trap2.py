"""The paper's command name: python -m training_scripts.math_training_trap2 --task gsm8k (defaults λ = 0.01)."""
from training_scripts.math import main

if __name__ == "__main__":
    main(defaults={"lambda_reg": 0.01})
