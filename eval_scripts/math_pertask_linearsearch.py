"""The paper's command name for the math merges (GSM8K + ASDiv adapters, Task Arithmetic):

    python -m eval_scripts.math_pertask_linearsearch --config configs/merge/offline_math_gsm8k.yaml

Same options and protocol as python -m eval_scripts, with the release's math search: Task Arithmetic in full
space, coefficients 0.1 … 10.0, selected by the raw mean greedy-generation accuracy (not normalised).
"""
from eval_scripts.__main__ import main
from models.runtime import run_cli

if __name__ == "__main__":
    run_cli(lambda: main(defaults={"merge_method": "tv", "merge_space": "full", "coef_stop": 10.0,
                                   "normalise": False, "eval_batch_size": 16}))
