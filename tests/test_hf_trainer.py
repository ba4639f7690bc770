"""Trap2Trainer: Trap² inside transformers' Trainer gives the same gradient as our own loop."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from models.updates import ScaledUpdate
from training_scripts.hf_trainer import Trap2Config, Trap2Trainer, per_example_loss
from training_scripts.runs import build_objective

TRAP2 = Trap2Config(lambda_reg=0.3, rand_alpha_weight="inv_sqrt", scale_samples=2, off_loss_cap=5.0, seed=7)


def _model():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    model = get_peft_model(lm, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                          init_lora_weights=False))
    return model


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _trap2_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_step_equals_our_objectives_gradient(accumulation, tmp_path):
    batches = [_batch(i) for i in range(accumulation)]
    ours = _model()
    objective, update = build_objective(TRAP2), ScaledUpdate.lora(ours)
    for batch in batches:  # our loop: each micro-batch contributes 1/k of the step
        objective.backward(ours, update, per_example_loss, batch, scale_loss=lambda loss: loss / accumulation)
    theirs = _model()
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=accumulation, report_to=[],
                             use_cpu=True)
    trainer = Trap2Trainer(model=theirs, args=args, trap2=TRAP2)
    for batch in batches:
        trainer.training_step(theirs, batch)
    expected, got = _trap2_grads(ours), _trap2_grads(theirs)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-7), name
    plain = _model()
    Trap2Trainer(model=plain, args=args, trap2=Trap2Config(lambda_reg=0.0)).training_step(plain, batches[0])
    assert any(not torch.allclose(_trap2_grads(plain)[n], got[n]) for n in got)  # the off-scale term acts


def test_trainer_trains_end_to_end_with_accumulation(tmp_path):
    model = _model()
    data = [{k: v[0] for k, v in _batch(i).items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trap2Trainer(model=model, args=args, train_dataset=data, trap2=TRAP2).train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_trl_sft_trainer_with_trap2_steps_with_our_objectives_gradient(tmp_path):
    import copy

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from models.causal_lm import load_causal_lm
    from test_math import TINY_LM
    from training_scripts.hf_trainer import with_trap2

    lm = load_causal_lm("offline-llama", TINY_LM)
    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0, init_lora_weights=False))
    ours = copy.deepcopy(model)  # our loop, without the gradient checkpointing TRL turns on
    data = Dataset.from_list([{"prompt": f"What is {i} plus 2? ", "completion": f"{i} + 2 = {i + 2}"}
                              for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", completion_only_loss=True, gradient_checkpointing=True)
    trainer_class = with_trap2(SFTTrainer)
    assert trainer_class is with_trap2(SFTTrainer) and issubclass(trainer_class, SFTTrainer)
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=lm.tokenizer, trap2=TRAP2)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # the prompt is masked
    objective = build_objective(TRAP2)
    objective.backward(ours, ScaledUpdate.lora(ours), per_example_loss, batch)
    trainer.training_step(model, batch)
    expected, got = _trap2_grads(ours), _trap2_grads(model)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    with pytest.raises(TypeError, match="Trainer subclass"):
        with_trap2(object)


def test_trap2_trainer_under_torchrun_keeps_identical_weights_on_both_processes(tmp_path):
    from conftest import weights_of_two_processes

    first, second = weights_of_two_processes("ddp_trainer_worker.py", tmp_path)
    assert len(first) == 3 and first == second
    assert len(set(first)) == 3  # the weights changed at every step
