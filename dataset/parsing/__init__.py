"""Zero-shot text heads of the paper's datasets (`python -m dataset.parsing.generate_clip_heads`)."""
