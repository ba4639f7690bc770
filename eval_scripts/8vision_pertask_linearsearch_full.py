"""The paper's command name: python -m eval_scripts.8vision_pertask_linearsearch_full (same options as python -m eval_scripts)."""
from eval_scripts.__main__ import main
from models.runtime import run_cli

if __name__ == "__main__":
    run_cli(main)
