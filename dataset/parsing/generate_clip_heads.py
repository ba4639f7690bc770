"""python -m dataset.parsing.generate_clip_heads [--model clip-vit-b32|clip-vit-l14] [--base_options ...]"""
from dataset.parsing.heads import main
from models.runtime import run_cli

if __name__ == "__main__":
    run_cli(lambda: main(default_model="clip-vit-b32", family="hf-clip"))
