"""python -m dataset.parsing.generate_openclip_heads [--model convnext-base-w] [--base_options ...]"""
from dataset.parsing.heads import main

if __name__ == "__main__":
    main(default_model="convnext-base-w", family="open-clip")
