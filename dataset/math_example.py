"""One math problem in the GSM8K answer format (its own module: the real and the generated tasks both use it)."""
from __future__ import annotations

from dataclasses import dataclass

PROMPT = "Question: {question}\nAnswer: Let's think step by step.\n"


@dataclass(frozen=True)
class MathExample:
    question: str
    target: str  # what the model learns to write: reasoning ending in "#### <answer>"
    answer: str  # the reference answer

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)
