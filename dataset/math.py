"""Math reasoning tasks in the GSM8K answer format: prompts, splits, answer extraction, scoring.

    prompt = "Question: {question}\\nAnswer: Let's think step by step.\\n"     target = reasoning + "#### <number>"

- gsm8k: the official test split; 10 % of train held out for validation (seed 42).
- asdiv: one split, 70/15/15 train/val/test (seed 42); question = body + " " + question,
  target = "{formula}\\n#### {number}".
- offline-gsm8k / offline-asdiv: generated stand-ins (dataset.math_offline), no network needed.
Both real sets load through `datasets`: from the hub, or from local JSON-lines files under
`data_root` (gsm8k/{train,test}.jsonl as in the official repository, asdiv/asdiv.jsonl).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dataset.math_example import MathExample

TASKS = ("gsm8k", "asdiv", "offline-gsm8k", "offline-asdiv")


@dataclass
class MathTask:
    name: str
    splits: dict[str, list[MathExample]]


# ---- answers ----------------------------------------------------------------------------------
_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?"


def extract_answer(text: str) -> str | None:
    """The text after the first "####" (its first number), else the last number in the text."""
    text = text.replace("\u2212", "-")
    if "####" in text:
        tail = text.split("####", 1)[1].strip()
        tail = re.sub(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", r"\1/\2", tail)
        m = re.search(_NUMBER, tail.replace("$", ""))
        if m:
            return m.group(0)
        first_line = tail.splitlines()[0].strip() if tail else ""
        return first_line or None
    text = re.sub(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", r"\1/\2", text)
    numbers = re.findall(_NUMBER, text.replace("$", ""))
    return numbers[-1] if numbers else None


def to_number(answer: str | None) -> float | None:
    """Numeric value of an answer string: commas, $, %, \\boxed{}, \\frac{}{} and a/b handled."""
    if answer is None:
        return None
    s = answer.strip().replace("\u2212", "-")
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    s = re.sub(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", r"\1/\2", s)
    s = s.replace(",", "").replace("$", "").replace("%", "").strip().rstrip(".")
    try:
        if "/" in s:
            num, den = (float(part) for part in s.split("/", 1))
            return num / den if den else None
        return float(s)
    except ValueError:
        return None


def is_correct(generated: str, reference: str) -> bool:
    """Numeric comparison; a reference that is not a number (an ASDiv ratio such as "3:1") is
    compared as text with the first line after "####"."""
    b = to_number(reference)
    if b is None:
        if "####" not in generated:
            return False
        lines = generated.split("####", 1)[1].strip().splitlines()
        squash = lambda t: re.sub(r"\s+", "", t).lower()  # noqa: E731
        return bool(lines) and squash(lines[0]) == squash(reference)
    a = to_number(extract_answer(generated))
    return a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


# ---- loading ----------------------------------------------------------------------------------
def _answer_after_hashes(target: str) -> str:
    return target.split("####", 1)[1].strip().replace(",", "")


def _asdiv_example(row: dict) -> MathExample:
    number = re.sub(r"\s*\(.*\)\s*$", "", str(row["answer"]).strip())  # "9 (apples)" -> "9"
    question = f"{row['body'].strip()} {row['question'].strip()}"
    return MathExample(question, f"{row['formula'].strip()}\n#### {number}", number)


def _load(hub_id: str, config: str | None, local_files: dict[str, Path]):
    from datasets import load_dataset

    if all(p.exists() for p in local_files.values()):
        return load_dataset("json", data_files={k: str(p) for k, p in local_files.items()})
    try:
        return load_dataset(hub_id, config)
    except Exception as e:  # no network, no cache: say what to put where
        wanted = ", ".join(str(p) for p in local_files.values())
        raise FileNotFoundError(f"could not load {hub_id} from the hub ({type(e).__name__}: {e}).\nOffline, put the "
                                f"JSON-lines files at {wanted} (or pass --data_root).") from None


def load_math_task(name: str, data_root: str | os.PathLike | None = None, seed: int = 42,
                   sizes: dict[str, int] | None = None) -> MathTask:
    """train/val/test examples of a task; `sizes` caps each split (quick runs), or sets the
    generated splits' sizes for the offline stand-ins."""
    if name not in TASKS:
        raise KeyError(f"unknown math task {name!r}; choose one of {TASKS}")
    if name.startswith("offline-"):
        from dataset.math_offline import generate_task

        return MathTask(name, generate_task(name, seed=seed, sizes=sizes))
    root = Path(data_root) if data_root else Path(os.environ.get("TRAP2_DATASETS") or "data/datasets")
    if name == "gsm8k":
        ds = _load("openai/gsm8k", "main", {"train": root / "gsm8k" / "train.jsonl",
                                            "test": root / "gsm8k" / "test.jsonl"})
        held = ds["train"].train_test_split(test_size=0.1, seed=seed)
        raw = {"train": held["train"], "val": held["test"], "test": ds["test"]}
        splits = {k: [MathExample(r["question"], r["answer"], _answer_after_hashes(r["answer"])) for r in v]
                  for k, v in raw.items()}
    else:
        ds = _load("EleutherAI/asdiv", None, {"validation": root / "asdiv" / "asdiv.jsonl"})
        rows = ds[next(iter(ds))]
        first = rows.train_test_split(test_size=0.3, seed=seed)
        rest = first["test"].train_test_split(test_size=0.5, seed=seed)
        raw = {"train": first["train"], "val": rest["train"], "test": rest["test"]}
        splits = {k: [_asdiv_example(r) for r in v] for k, v in raw.items()}
    for split, cap in (sizes or {}).items():
        splits[split] = splits[split][:cap]
    return MathTask(name, splits)
