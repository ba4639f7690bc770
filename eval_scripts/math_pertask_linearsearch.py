"""The paper's command name for the math merges (GSM8K + ASDiv adapters, Task Arithmetic):

    python -m eval_scripts.math_pertask_linearsearch --config configs/merge/offline_math_gsm8k.yaml

Same options and protocol as python -m eval_scripts; the coefficient search starts at the paper's
default c = 0.3 neighbourhood (0.1 … 2.0) and scores greedy-generation accuracy.
"""
from eval_scripts.__main__ import main
from models.runtime import run_cli

if __name__ == "__main__":
    run_cli(lambda: main(defaults={"merge_method": "tv", "merge_space": "full", "coef_stop": 2.0,
                                   "eval_batch_size": 16}))
