"""Math trainer: Trap² for causal-LM LoRA (GSM8K, ASDiv and their offline stand-ins).

    python -m training_scripts.math_training --task gsm8k                # unprotected
    python -m training_scripts.math_training_trap2 --task gsm8k          # λ = 0.01, w(s) = 1/sqrt(s)
    torchrun --nproc_per_node 4 -m training_scripts.math_training_trap2 --task gsm8k --grad_accum 2

The same objective and loop as the vision trainers; the loss covers the answer tokens only; the
validation metric is greedy-generation accuracy (the answer after "####", compared numerically).
Under torchrun / accelerate launch each process takes its own shard of every batch and of the
validation set, and gradients are averaged (models.distributed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dataset.math import MathExample, MathTask, load_math_task
from models import distributed
from models.causal_lm import CausalLM, accuracy, answer_token_cross_entropy, load_causal_lm
from models.options import check_choice, option
from models.runtime import pin_threads, provenance, resolve_device, run_cli
from models.updates import ScaledUpdate, save_update
from training_scripts.config import RunConfig, config_dict, parse_run_config, run_name
from training_scripts.loop import run_loop
from training_scripts.runs import (build_objective, close_run_dir, epoch_order, loop_settings, open_run_dir, publish,
                                   seed_everything)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class MathConfig(RunConfig):
    """Reference spec §2 (math): LoRA r 32 / α 32 / dropout 0.1 on q/k/v/o, AdamW lr 1e-4, linear
    schedule with warm-up, batch 4, max length 512, 256 new tokens, w(s) = 1/sqrt(s)."""

    task: str = option("", "gsm8k, asdiv, or the offline stand-ins offline-gsm8k, offline-asdiv")
    peft: str = option("lora", "lora, or qlora: the frozen base loaded in 4-bit NF4 through bitsandbytes (a CUDA "
                               "GPU), the LoRA factors trained on top as usual")
    model: str = option("meta-llama/Llama-3.1-8B", "any AutoModelForCausalLM id, or offline-llama")
    model_options: dict | None = option(
        None, "{pretrained: local folder} for hub models; recipe overrides for offline-llama")
    data_root: str | None = option(None, "where the math datasets lie")
    data_seed: int = option(42, "seed of the data splits")
    split_sizes: dict[str, int] | None = option(None, "caps (real tasks) or generated sizes (offline stand-ins)")
    model_dtype: str = option("auto", "dtype the LLM is loaded in: auto (bf16 on GPU, fp32 on CPU), fp16 (as the "
                                      "release), bf16 or fp32")
    stop_on: str = option(
        "accuracy", "validation metric for early stopping and the kept checkpoint: accuracy (greedy exact match) "
                    "or loss (answer-token cross-entropy, as the release)")
    padding_side: str = option("right", "where training batches are padded: right, or left as the release")
    max_length: int = option(512, "longest prompt + answer in tokens")
    max_new_tokens: int = option(256, "tokens generated per answer at evaluation")
    val_limit: int | None = option(None, "validation problems per evaluation (generation is the slow part)")
    report_scales: list[float] = option(
        factory=lambda: [0.0, 0.5, 1.0], help="scales s at which the finished update's test accuracy is reported")
    rand_alpha_weight: str = option(
        "inv_sqrt", "w(s): inv (1/s), inv_sqrt (1/sqrt(s), the release's math default) or none")
    lora_rank: int = option(32, "LoRA rank r (paper: 32)")
    lora_alpha: float = option(32.0, "LoRA alpha (paper: 32)")
    lr: float | None = option(1e-4, "peak learning rate (paper: 1e-4)")
    batch_size: int = option(4, "examples per process and micro-batch (paper: 4)")
    schedule: str = option("linear", "LR decay after warm-up: linear (paper) or cosine")
    warmup_steps: int = option(100, "linear warm-up steps")
    eval_freq: int = option(500, "steps between validation evaluations")
    eval_batch_size: int = option(16, "batch size of generation")
    amp: str = option("auto", "mixed precision: auto (bf16 on GPU, none on CPU), fp16, bf16 or none")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 8 or self.max_new_tokens < 1:
            raise ValueError("--max_length must be >= 8 and --max_new_tokens >= 1")
        check_choice("model_dtype", self.model_dtype, ("auto", "fp16", "bf16", "fp32"))
        check_choice("stop_on", self.stop_on, ("accuracy", "loss"))
        check_choice("padding_side", self.padding_side, ("right", "left"))
        check_choice("peft", self.peft, ("lora", "qlora"))  # the math trainer trains adapters

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1e-4

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / "math" / self.model.replace("/", "--") / run_name(self.task, self.protected)


def encode(example: MathExample, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Prompt + target + EOS; labels are -100 on the prompt, so only the answer is learned."""
    prompt = tokenizer(example.prompt).input_ids
    target = tokenizer(example.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids, labels = prompt + target, [-100] * len(prompt) + target
    return ids[:max_length], labels[:max_length]


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """A padded batch (on the right, or on the left as the release's math training pads)."""
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        place = slice(width - len(a), width) if left else slice(0, len(a))
        ids[i, place], labels[i, place], mask[i, place] = torch.tensor(a), torch.tensor(b), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def validation_loss(model, encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                    device: torch.device, left: bool = False) -> float:
    """Mean answer-token cross-entropy over the validation examples (the release's stopping metric)."""
    was_training = model.training
    model.eval()
    losses = [answer_token_losses(model, {n: t.to(device) for n, t in collate(encoded[i:i + batch_size], pad_id,
                                                                             left).items()})
              for i in range(0, len(encoded), batch_size)]
    model.train(was_training)
    return float(torch.cat(losses).mean())


def answer_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of each answer token (labels != -100), the causal LM's examples for the objective: their mean
    is the model's own loss, and --off_loss_cap caps each token, as it caps each image in vision."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return answer_token_cross_entropy(logits, batch["labels"])


class MicroBatches:
    """batch_at(i): micro-batch i of this process: epoch-wise seeded permutations, sharded by rank."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], batch_size: int, seed: int, pad_id: int,
                 device: torch.device, left: bool = False):
        self.encoded, self.batch_size, self.seed, self.pad_id, self.device = encoded, batch_size, seed, pad_id, device
        self.left = left
        self.per_epoch = max(1, len(encoded) // batch_size)
        self.order: tuple[int, torch.Tensor] | None = None

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        g = index * distributed.world_size() + distributed.rank()
        epoch, k = divmod(g, self.per_epoch)
        if self.order is None or self.order[0] != epoch:
            self.order = (epoch, epoch_order(len(self.encoded), self.seed, epoch))
        picks = self.order[1][k * self.batch_size:(k + 1) * self.batch_size].tolist()
        return {n: t.to(self.device)
                for n, t in collate([self.encoded[i] for i in picks], self.pad_id, self.left).items()}


def attach_lora(lm: CausalLM, cfg: MathConfig) -> ScaledUpdate:
    from peft import LoraConfig, get_peft_model

    if cfg.gradient_checkpointing:
        lm.model.activation_checkpointing_enable({"use_reentrant": False})
    lm.model = get_peft_model(lm.model, LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_targets or LLAMA_TARGETS, bias="none", task_type="CAUSAL_LM", use_dora=cfg.use_dora))
    return ScaledUpdate.lora(lm.model)


def train_math(cfg: MathConfig, on_step: Callable[[int, list], None] | None = None) -> Path:
    """Trains one LoRA update on a math task and saves it (PEFT folder + metadata) on the main process."""
    if not cfg.task:
        raise ValueError("--task is required (gsm8k, asdiv, offline-gsm8k or offline-asdiv)")
    device = distributed.init_from_env(resolve_device(cfg.device))
    pin_threads(device)
    main = distributed.is_main()
    out_dir = cfg.resolved_output_dir()
    if open_run_dir(cfg, out_dir, write=main):
        return out_dir
    distributed.barrier()
    task: MathTask = load_math_task(cfg.task, cfg.data_root, cfg.data_seed, cfg.split_sizes)
    seed_everything(cfg.seed)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes.get(cfg.model_dtype, torch.bfloat16 if device.type == "cuda" else None)
    quantization = "nf4" if cfg.peft == "qlora" else "none"
    lm = load_causal_lm(cfg.model, cfg.model_options, dtype, quantization, device)
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        lm.model = prepare_model_for_kbit_training(lm.model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    seed_everything(cfg.seed)  # the adapter's initialisation must not depend on what loading consumed
    update = attach_lora(lm, cfg)
    if not getattr(lm.model, "is_loaded_in_4bit", False):  # a 4-bit base was placed while loading
        lm.model.to(device)
    tokenizer = lm.tokenizer
    encoded = [encode(ex, tokenizer, cfg.max_length) for ex in task.splits["train"]]
    val = task.splits["val"][:cfg.val_limit] if cfg.val_limit else task.splits["val"]

    def loss_fn(model, batch):
        return answer_token_losses(model, batch)

    left = cfg.padding_side == "left"
    encoded_val = [encode(ex, tokenizer, cfg.max_length) for ex in val]

    def score_val_accuracy() -> float:
        return accuracy(lm.model, tokenizer, val, cfg.eval_batch_size, cfg.max_new_tokens, device, cfg.progress)

    def evaluate() -> float:  # higher is better: the loop keeps the best and stops early on it
        if cfg.stop_on == "loss":
            return -validation_loss(lm.model, encoded_val, cfg.eval_batch_size, tokenizer.pad_token_id, device, left)
        return score_val_accuracy()

    result = run_loop(lm.model, update, build_objective(cfg), loss_fn,
                      MicroBatches(encoded, cfg.batch_size, cfg.seed, tokenizer.pad_token_id, device, left), evaluate,
                      loop_settings(cfg, device, auto_amp="bf16"), out_dir, device, on_step)
    test_by_scale = {}
    for s in cfg.report_scales:
        with update.set_scale(s):
            test_by_scale[f"{s:g}"] = {"accuracy": accuracy(lm.model, tokenizer, task.splits["test"],
                                                            cfg.eval_batch_size, cfg.max_new_tokens, device,
                                                            cfg.progress)}
    val_accuracy = score_val_accuracy()
    if main:
        metadata = {
            "task": cfg.task, "suite": "math", "base_model": cfg.model, "base_options": lm.options,
            "base_fingerprint": lm.fingerprint, "quantization": quantization, "protected": cfg.protected,
            "lambda_reg": cfg.lambda_reg,
            "seed": cfg.seed, "config": config_dict(cfg), "val_accuracy": val_accuracy,
            "test_accuracy": test_by_scale.get("1", {}).get("accuracy"), "test_by_scale": test_by_scale,
            "best_step": result.best_step, "steps_run": result.steps_run, "stopped_early": result.stopped_early,
            "train_seconds": round(result.seconds, 1), "processes": distributed.world_size(),
            "provenance": provenance(lm.fingerprint),
        }
        save_update(out_dir, lm.model, update, metadata)
        close_run_dir(out_dir)
        print(json.dumps({k: metadata[k] for k in ("task", "protected", "val_accuracy", "test_accuracy")}
                         | {"test_accuracy_by_scale": {s: round(r["accuracy"], 4) for s, r in test_by_scale.items()}}))
    distributed.barrier()
    return out_dir


def main(argv=None, protected: bool | None = None) -> None:
    """`protected`: set by the paper's command names (True: Trap², False: the unprotected baseline)."""
    cfg = parse_run_config(MathConfig, argv, "Train one math LoRA update, protected with Trap² when --lambda_reg > 0.",
                           protected)
    publish(cfg, train_math(cfg))


if __name__ == "__main__":
    run_cli(main)
