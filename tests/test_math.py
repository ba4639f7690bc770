"""The LLM path on the offline stand-ins: answer scoring, label masking, sharded batches, the whole
loop (train both, protect one, merge, generate, score) and 2-process training under torchrun."""
import json

import pytest
import torch

from conftest import weights_of_two_processes
from dataset.math import MathExample, extract_answer, is_correct, load_math_task, to_number
from models.updates import METADATA_FILE, load_update
from training_scripts.math import MathConfig, MicroBatches, encode, train_math

TINY_LM = {"steps": 30, "pretext_train": 400, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2}


GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text,expected", [
    (GSM8K_ANSWER, 72.0),
    ("He pays 2 * 500 = <<2*500=1000>>1000 dollars.\n#### 1,000", 1000.0),
    ("The temperature drops 5 degrees below zero.\n#### -5", -5.0),
    ("Each cup holds half a litre.\n#### 0.5", 0.5),
    ("So the total is $1,234.50.", 1234.5),  # no "####": the last number
    ("#### \\frac{3}{4}", 0.75),
    ("The answer is 12 apples and then 7\n#### 19\nQuestion: what about 3?", 19.0),  # first "####" wins
    ("I do not know.", None),
    ("#### twelve", None),
])
def test_answer_extraction_on_real_gsm8k_formats(text, expected):
    value = to_number(extract_answer(text))
    assert value == pytest.approx(expected) if expected is not None else value is None


def test_scoring_is_numeric():
    assert is_correct("3+4=7\n#### 7.0", "7") and is_correct("#### 1,000", "1000")
    assert not is_correct("#### 71", "72") and not is_correct("no answer", "72")
    assert is_correct("#### 3:1", "3:1")  # non-numeric ASDiv answers compare as text


def test_encode_learns_only_the_answer():
    from models.causal_lm import char_tokenizer

    tok = char_tokenizer()
    ex = MathExample("What is 1 plus 2?", "1+2=3\n#### 3", "3")
    ids, labels = encode(ex, tok, 512)
    n_prompt = len(tok(ex.prompt).input_ids)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert tok.decode(labels[n_prompt:-1]) == ex.target and labels[-1] == tok.eos_token_id and ids[n_prompt:] == labels[n_prompt:]
    assert len(encode(ex, tok, 20)[0]) == 20


def test_offline_tasks_are_seeded_disjoint_and_in_gsm8k_format():
    a = load_math_task("offline-gsm8k", sizes={"train": 300, "val": 50, "test": 50})
    b = load_math_task("offline-gsm8k", sizes={"train": 300, "val": 50, "test": 50})
    assert a.splits == b.splits
    questions = [{ex.question for ex in a.splits[s]} for s in ("train", "val", "test")]
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2]) and not (questions[1] & questions[2])
    for ex in a.splits["train"][:50] + load_math_task("offline-asdiv").splits["test"][:50]:
        assert is_correct(ex.target, ex.answer)  # every target's own answer scores as correct


def test_micro_batches_are_sharded_by_process(monkeypatch):
    from models import distributed

    encoded = [([i, i], [i, i]) for i in range(40)]
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        batches = MicroBatches(encoded, 4, seed=0, pad_id=0, device=torch.device("cpu"))
        seen.append([set(batches(i)["input_ids"][:, 0].tolist()) for i in range(4)])
    for mine, theirs in zip(*seen):  # the two processes never see the same example in the same step
        assert not (mine & theirs)
    assert len(set().union(*seen[0], *seen[1])) == 32  # 8 batches of 4 within one epoch: no repeats


def _args(tmp_path, name, **extra):
    args = dict(model="offline-llama", model_options=dict(TINY_LM), split_sizes={"train": 60, "val": 8, "test": 8},
                max_steps=6, eval_freq=3, batch_size=4, warmup_steps=1, lr=1e-2, max_new_tokens=12,
                eval_batch_size=8, device="cpu", output_dir=str(tmp_path / name), progress=False)
    args.update(extra)
    return MathConfig(**args)


def test_offline_math_loop_trains_protects_merges_and_scores(tmp_path):
    from peft import PeftModel

    from eval_scripts.linear_search import MergeConfig, run_merge_eval
    from models.causal_lm import load_causal_lm

    runs = {"gsm8k-trap2": train_math(_args(tmp_path, "gsm8k-trap2", task="offline-gsm8k", lambda_reg=0.1)),
            "gsm8k-plain": train_math(_args(tmp_path, "gsm8k-plain", task="offline-gsm8k")),
            "asdiv-plain": train_math(_args(tmp_path, "asdiv-plain", task="offline-asdiv"))}
    meta = json.loads((runs["gsm8k-trap2"] / METADATA_FILE).read_text())
    assert meta["suite"] == "math" and meta["protected"] and set(meta["test_by_scale"]) == {"0", "0.5", "1"}
    update = load_update(runs["gsm8k-trap2"])
    assert update.kind == "lora" and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                     "o_proj.weight")) for n in update.names())
    lm = load_causal_lm("offline-llama", TINY_LM)
    update.check_base(lm.fingerprint, lm.model.state_dict())
    peft_model = PeftModel.from_pretrained(lm.model, runs["gsm8k-trap2"])  # a standard PEFT adapter
    assert peft_model.peft_config["default"].r == 32

    out = run_merge_eval(MergeConfig(target="offline-gsm8k", protected=[str(runs["gsm8k-trap2"])],
                                     control=[str(runs["gsm8k-plain"])], others=[str(runs["asdiv-plain"])],
                                     coef_stop=0.3, method_grid=False, eval_batch_size=8, device="cpu",
                                     output_dir=str(tmp_path / "merge"), progress=False))
    summary = json.loads((out / "summary.json").read_text())
    for scenario in ("protected", "control"):
        test = summary["scenarios"][scenario]["test"]
        assert set(test) == {"offline-gsm8k", "offline-asdiv"} and all(0 <= a <= 1 for a in test.values())
    alone = summary["pre_merge"]["alone"]["test"][str(runs["gsm8k-trap2"])]["offline-gsm8k"]
    assert alone == pytest.approx(meta["test_accuracy"])  # the evaluator's s = 1 equals the trainer's


def test_two_processes_under_torchrun_hold_identical_weights_after_every_step(tmp_path):
    first, second = weights_of_two_processes("ddp_math_worker.py", tmp_path, json.dumps(TINY_LM))
    assert len(first) == 4 and first == second
    assert len(set(first)) == 4  # the weights did change at every step
    assert (tmp_path / "run" / METADATA_FILE).exists()
    assert json.loads((tmp_path / "run" / METADATA_FILE).read_text())["processes"] == 2


def test_real_gsm8k_and_asdiv_load_from_local_files_with_the_paper_splits(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "asdiv").mkdir()
    rows = [{"question": f"Q{i}: what is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1:,}"}
            for i in range(998, 1048)]
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:40]) + "\n")
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[40:]) + "\n")
    gsm = load_math_task("gsm8k", tmp_path)
    assert [len(gsm.splits[s]) for s in ("train", "val", "test")] == [36, 4, 10]
    assert all(is_correct(ex.target, ex.answer) for ex in gsm.splits["train"])
    assert gsm.splits["test"][0].answer == "1039" and gsm.splits["test"][0].prompt.endswith("step by step.\n")
    asdiv = [{"body": f"Seven apples and {i} pears are in a bowl.", "question": "How many fruits are there?",
              "answer": f"{7 + i} (fruits)", "formula": f"7+{i}={7 + i}", "solution_type": "Addition"}
             for i in range(40)]
    (tmp_path / "asdiv" / "asdiv.jsonl").write_text("\n".join(json.dumps(r) for r in asdiv) + "\n")
    task = load_math_task("asdiv", tmp_path)
    assert [len(task.splits[s]) for s in ("train", "val", "test")] == [28, 6, 6]
    ex = task.splits["train"][0]
    assert ex.question.startswith("Seven apples") and ex.question.endswith("How many fruits are there?")
    assert ex.target.splitlines()[-1] == f"#### {ex.answer}" and "(" not in ex.answer
    with pytest.raises(KeyError, match="unknown math task"):
        load_math_task("math500")


def test_answer_token_losses_average_to_the_models_own_loss():
    """The math LossFn gives one loss per answer token; their mean is the causal LM's loss on the batch."""
    from models.causal_lm import load_causal_lm
    from training_scripts.math import answer_token_losses, collate, encode

    lm = load_causal_lm("offline-llama", TINY_LM)
    task = load_math_task("offline-gsm8k", seed=0, sizes={"train": 6, "val": 2, "test": 2})
    batch = collate([encode(ex, lm.tokenizer, 512) for ex in task.splits["train"][:4]], lm.tokenizer.pad_token_id)
    losses = answer_token_losses(lm.model, batch)
    assert losses.dim() == 1 and len(losses) == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(losses.mean(), lm.model(**batch).loss.float(), atol=1e-5)


def test_release_math_training_options(tmp_path):
    """Left padding keeps the same answer tokens (and their loss, up to rounding); stopping on validation loss
    trains, keeps a checkpoint and reports."""
    from models.causal_lm import load_causal_lm
    from training_scripts.math import answer_token_losses, collate, encode, validation_loss

    lm = load_causal_lm("offline-llama", TINY_LM)
    task = load_math_task("offline-gsm8k", seed=0, sizes={"train": 6, "val": 2, "test": 2})
    pairs = [encode(ex, lm.tokenizer, 512) for ex in task.splits["train"][:3]]
    right, left = collate(pairs, lm.tokenizer.pad_token_id), collate(pairs, lm.tokenizer.pad_token_id, left=True)
    assert (left["attention_mask"][:, -1] == 1).all() and (right["attention_mask"][:, 0] == 1).all()
    assert torch.equal(right["labels"][right["labels"] != -100], left["labels"][left["labels"] != -100])
    loss = validation_loss(lm.model, pairs, 2, lm.tokenizer.pad_token_id, torch.device("cpu"))
    assert abs(loss - float(answer_token_losses(lm.model, right).mean())) < 1e-5
    out = train_math(_args(tmp_path, "run", task="offline-gsm8k", lambda_reg=0.05, stop_on="loss", padding_side="left"))
    assert json.loads((out / "trap2_update.json").read_text())["config"]["stop_on"] == "loss"


def test_qlora_refuses_before_loading_where_4bit_cannot_run(tmp_path, monkeypatch):
    import models.causal_lm as causal_lm

    loads = []
    monkeypatch.setattr(causal_lm, "offline_lm_folder", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train_math(_args(tmp_path, "q", task="offline-gsm8k", peft="qlora"))
    assert loads == [] and not (tmp_path / "q" / METADATA_FILE).exists()
    with pytest.raises(ValueError, match="--peft must be lora or qlora"):
        _args(tmp_path, "x", task="offline-gsm8k", peft="full")


def test_the_qlora_path_trains_saves_and_merges_with_4bit_loading_skipped(tmp_path, monkeypatch):
    """bitsandbytes cannot run on this CPU, so only the 4-bit loading is skipped (the base loads unquantized);
    everything after it runs: k-bit preparation, LoRA, Trap² training, the release (quantization recorded)
    and its evaluation on a base loaded the same way."""
    import models.causal_lm as causal_lm
    from eval_scripts.linear_search import MergeConfig, run_merge_eval

    monkeypatch.setattr(causal_lm, "four_bit_unavailable", lambda device: None)
    asked = []
    monkeypatch.setattr(causal_lm, "quantization_config", lambda q, dtype: asked.append(q))  # None: skip 4-bit
    runs = {name: train_math(_args(tmp_path, name, task=f"offline-{task}", peft="qlora", lambda_reg=lam,
                                   max_steps=3, eval_freq=3))
            for name, task, lam in (("gsm8k-trap2", "gsm8k", 0.1), ("gsm8k-plain", "gsm8k", 0.0),
                                    ("asdiv-plain", "asdiv", 0.0))}
    assert set(asked) == {"nf4"}
    meta = json.loads((runs["gsm8k-trap2"] / METADATA_FILE).read_text())
    assert meta["quantization"] == "nf4" and meta["config"]["peft"] == "qlora"
    out = run_merge_eval(MergeConfig(target="offline-gsm8k", protected=[str(runs["gsm8k-trap2"])],
                                     control=[str(runs["gsm8k-plain"])], others=[str(runs["asdiv-plain"])],
                                     coef_start=0.5, coef_stop=1.0, coef_step=0.5, patience=1, method_grid=False,
                                     output_dir=str(tmp_path / "merge"), progress=False, eval_batch_size=8))
    assert json.loads((out / "summary.json").read_text())["scenarios"]["protected"]["test"]
    assert asked.count("nf4") == 4  # the evaluator loaded the base as the updates were trained
