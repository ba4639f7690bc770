"""python -m dataset.parsing.generate_openclip_heads [--model convnext-base-w] [--base_options ...]"""
from dataset.parsing.heads import main
from models.runtime import run_cli

if __name__ == "__main__":
    run_cli(lambda: main(default_model="convnext-base-w", family="open-clip"))
