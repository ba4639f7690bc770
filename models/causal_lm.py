"""Causal LMs for the math path: any `AutoModelForCausalLM` (default meta-llama/Llama-3.1-8B), or
`offline-llama`, a tiny LlamaForCausalLM pretrained here on generated arithmetic (dataset.math_offline).

The offline base is saved with save_pretrained under data/bases/<name>-<recipe hash>/ with a
character-level tokenizer built here, and loaded back through from_pretrained: the same code path
as the hub models. `python -m models.causal_lm` builds it ahead of time (~4 min on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dataset.math import is_correct
from dataset.math_example import MathExample
from models import distributed
from models.pretrain import recipe_hash
from models.runtime import run_cli
from models.schedules import warmup_times_cosine
from models.storage import atomic_path, cache_root
from models.updates import fingerprint

LM_RECIPES: dict[str, dict] = {
    "offline-llama": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                          max_position_embeddings=256, steps=700, batch_size=32, lr=3e-3, warmup=50,
                          pretext_train=5000, seed=0, corpus=3),
}
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


@dataclass
class CausalLM:
    model: nn.Module
    tokenizer: object
    name: str
    options: dict
    fingerprint: str


def char_tokenizer():
    """One token per printable ASCII character (and newline), plus <pad>, <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL.values())}
    for c in CHARS:
        vocab[c] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL["unk"]))
    core.decoder = decoders.Fuse()  # characters join without spaces
    core.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"])


def _pretrain(recipe: dict, folder: Path, progress: bool) -> dict:
    """Next-token pretraining on generated arithmetic (prompt + answer), then save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataset.math_offline import generate_task

    tokenizer = char_tokenizer()
    torch.manual_seed(recipe["seed"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe["hidden_size"],
                         intermediate_size=recipe["intermediate_size"], num_hidden_layers=recipe["num_hidden_layers"],
                         num_attention_heads=recipe["num_attention_heads"],
                         max_position_embeddings=recipe["max_position_embeddings"], tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    corpus = generate_task("pretext", seed=recipe["seed"], sizes={"train": recipe["pretext_train"], "val": 200,
                                                                  "test": 1})
    texts = [ex.prompt + ex.target + tokenizer.eos_token for ex in corpus["train"]]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    steps, warmup = recipe["steps"], recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_times_cosine, warmup=warmup, total=steps))
    gen = torch.Generator().manual_seed(recipe["seed"])
    model.train()
    bar = tqdm(range(steps), desc="pretraining offline-llama", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(texts), (recipe["batch_size"],), generator=gen).tolist()
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"final_loss": round(loss.item(), 4)}


def _lm_recipe(name: str, **overrides) -> tuple[dict, Path]:
    """The offline LM's recipe and the folder it is cached in."""
    if name not in LM_RECIPES:
        raise KeyError(f"no offline LM recipe {name!r}; choose one of {sorted(LM_RECIPES)}")
    unknown = set(overrides) - set(LM_RECIPES[name])
    if unknown:
        raise KeyError(f"unknown recipe fields {sorted(unknown)} for {name}")
    recipe = {**LM_RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}}
    return recipe, cache_root() / "bases" / f"{name}-{recipe_hash(recipe)}"


def offline_lm_is_built(name: str, **overrides) -> bool:
    return (_lm_recipe(name, **overrides)[1] / "recipe.json").exists()


def offline_lm_folder(name: str, progress: bool = True, **overrides) -> Path:
    """The folder of the pretrained offline LM `name`, pretraining it first if it is not cached."""
    recipe, folder = _lm_recipe(name, **overrides)
    if not (folder / "recipe.json").exists():
        start = time.time()
        with atomic_path(folder) as tmp:
            stats = _pretrain(recipe, tmp, progress)
            (tmp / "recipe.json").write_text(json.dumps({**recipe, **stats, "seconds": round(time.time() - start, 1)},
                                                        indent=2))
    return folder


QUANTIZATIONS = ("none", "nf4")  # nf4: QLoRA's 4-bit base


def four_bit_unavailable(device: torch.device) -> str | None:
    """Why a 4-bit NF4 base cannot be loaded here, or None when it can."""
    import importlib.util

    if device.type != "cuda":
        return f"4-bit loading through bitsandbytes needs a CUDA GPU; this process runs on {device.type}"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def quantization_config(quantization: str, compute_dtype: torch.dtype | None):
    """transformers' BitsAndBytesConfig for QLoRA's base (NF4, double quantisation), None for `none`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16)


def load_causal_lm(name: str, options: dict | None = None, dtype: torch.dtype | None = None,
                   quantization: str = "none", device: torch.device | None = None) -> CausalLM:
    """Model (frozen, eval) and tokenizer. `options`: offline recipe overrides, or for hub models
    {pretrained: local folder, revision: ...}; the hub token comes from $HF_TOKEN. `quantization` nf4
    loads the base in 4 bits onto `device` (QLoRA); its fingerprint is the 4-bit base's, so a QLoRA update
    is evaluated on the base it was trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization != "none":  # fail before loading anything
        reason = four_bit_unavailable(device or torch.device("cpu"))
        if reason:
            raise ValueError(f"{quantization} (QLoRA) base: {reason}; use --peft lora here")
    quantized = quantization_config(quantization, dtype)
    placement = {"device_map": {"": str(device)}} if quantized is not None else {}
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if name in LM_RECIPES:
        source, revision = offline_lm_folder(name, **options), None
    else:
        source, revision = options.get("pretrained") or name, options.get("revision")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, token=os.environ.get("HF_TOKEN"))
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype,
                                                     token=os.environ.get("HF_TOKEN"), quantization_config=quantized,
                                                     **placement)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the causal LM {source!r}: {e}\nFor gated models set HF_TOKEN; with no "
                      f"internet download it once elsewhere (huggingface-cli download {name}) and pass "
                      f"--model_options '{{pretrained: /path/to/folder}}'.") from None
    if tokenizer.pad_token is None:  # Llama ships none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    for p in model.parameters():
        p.requires_grad_(False)
    # bf16 values: the same base loaded in fp32 (CPU) or bf16 (GPU) gets the same fingerprint
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return CausalLM(model.eval(), tokenizer, name, options, fingerprint(state))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain (or find cached) the offline causal LM.")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    folder = offline_lm_folder("offline-llama", steps=args.steps)
    print(f"offline-llama: {folder} {json.loads((folder / 'recipe.json').read_text())}")


def answer_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each answer token (labels != -100) under next-token logits, in fp32: one loss
    per token, as the Trap² objective needs; their mean is the causal LM's own loss."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    answer = labels != -100
    return F.cross_entropy(logits[answer].float(), labels[answer], reduction="none")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, device: torch.device,
             progress: bool = False) -> list[str]:
    """Greedy completions (left-padded batches), without the prompt, cut at EOS."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = side
    model.train(was_training)
    return outputs


def accuracy(model, tokenizer, examples: list[MathExample], batch_size: int, max_new_tokens: int,
             device: torch.device, progress: bool = False) -> float:
    """Generation accuracy; under several processes each scores its shard and the counts are summed."""
    mine = examples[distributed.rank()::distributed.world_size()]
    texts = generate(model, tokenizer, [ex.prompt for ex in mine], batch_size, max_new_tokens, device,
                     progress and distributed.is_main())
    correct = sum(is_correct(t, ex.answer) for t, ex in zip(texts, mine))
    total_correct, total = distributed.sum_over_processes([correct, len(mine)], device)
    return total_correct / max(total, 1)


if __name__ == "__main__":
    run_cli(main)
