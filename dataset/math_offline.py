"""Generated arithmetic word problems in the GSM8K answer format (the offline LLM stand-ins).

- pretext (base pretraining only): bare arithmetic questions (+, -, ×) and one-step word problems
  about animals arriving and pages left to read.
- offline-gsm8k: two-step problems (a person gains, then loses, items): "5+3=8\\n8-2=6\\n#### 6".
- offline-asdiv: one-step multiplication and division problems: "4*6=24\\n#### 24".
Numbers stay small (operands up to 20 in the pretext, single digits in the tasks) so that a tiny
model pretrained for a few minutes knows the arithmetic facts the tasks need; the task templates
never appear in the pretext, so fine-tuning has something to learn.
Splits are disjoint by question text and fixed by the seed.
"""
from __future__ import annotations

import random

from dataset.math_example import MathExample

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lily", "Noah"]
ITEMS = ["apples", "stickers", "marbles", "cards", "shells", "pens", "books", "coins", "beads", "toys"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("tray", "trays")]
SIZES = {"train": 2000, "val": 200, "test": 300}
TASK_OFFSETS = {"pretext": 0, "offline-gsm8k": 1, "offline-asdiv": 2}


ANIMALS = ["birds", "ducks", "frogs", "bees", "cats", "fish"]


def _pretext(rng: random.Random) -> MathExample:
    kind = rng.randrange(5)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if kind == 0:
        return MathExample(f"What is {a} plus {b}?", f"{a}+{b}={a + b}\n#### {a + b}", str(a + b))
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return MathExample(f"What is {a} minus {b}?", f"{a}-{b}={a - b}\n#### {a - b}", str(a - b))
    if kind == 2:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        return MathExample(f"What is {a} times {b}?", f"{a}*{b}={a * b}\n#### {a * b}", str(a * b))
    if kind == 3:
        animal = rng.choice(ANIMALS)
        return MathExample(f"There are {a} {animal} in the park. {b} more {animal} arrive. How many {animal} are "
                           f"in the park now?", f"{a}+{b}={a + b}\n#### {a + b}", str(a + b))
    a, b = max(a, b), min(a, b)
    name = rng.choice(NAMES)
    return MathExample(f"A book has {a} pages. {name} has read {b} pages. How many pages are left to read?",
                       f"{a}-{b}={a - b}\n#### {a - b}", str(a - b))


def _two_step(rng: random.Random) -> MathExample:
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    c = rng.randint(1, a + b - 1)
    gain = rng.choice([f"buys {b} more {item}", f"finds {b} more {item}", f"gets {b} {item} from {other}"])
    loss = rng.choice([f"gives {c} {item} to {other}", f"loses {c} {item}", f"sells {c} {item}"])
    q = f"{name} has {a} {item}. Then {name} {gain} and {loss}. How many {item} does {name} have now?"
    return MathExample(q, f"{a}+{b}={a + b}\n{a + b}-{c}={a + b - c}\n#### {a + b - c}", str(a + b - c))


def _one_step_product(rng: random.Random) -> MathExample:
    (one, many), item = rng.choice(CONTAINERS), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        q = f"Each {one} holds {a} {item}. How many {item} are in {b} {many}?"
        return MathExample(q, f"{a}*{b}={a * b}\n#### {a * b}", str(a * b))
    q = f"{a * b} {item} are packed equally into {b} {many}. How many {item} are in each {one}?"
    return MathExample(q, f"{a * b}/{b}={a}\n#### {a}", str(a))


GENERATORS = {"pretext": _pretext, "offline-gsm8k": _two_step, "offline-asdiv": _one_step_product}


def generate_task(name: str, seed: int = 42, sizes: dict[str, int] | None = None) -> dict[str, list[MathExample]]:
    sizes = {**SIZES, **(sizes or {})}
    rng = random.Random(seed * 1000 + TASK_OFFSETS[name])
    make, seen, splits = GENERATORS[name], set(), {}
    for split in ("train", "val", "test"):
        out = []
        for _ in range(200 * sizes[split] + 1000):  # distinct questions; the space is far larger than asked
            if len(out) == sizes[split]:
                break
            ex = make(rng)
            if ex.question not in seen:
                seen.add(ex.question)
                out.append(ex)
        if len(out) < sizes[split]:
            raise ValueError(f"{name}: only {len(out)} distinct questions for {split}; ask for fewer")
        splits[split] = out
    return splits
