"""Synthetic arithmetic with a verifiable reward: `a+b=` -> the decimal sum.

Problems are generated from a seed, so nothing is downloaded; a held-out set is
carved out once and never sampled for training, so before/after accuracy on it
measures generalisation, not memorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import pyarrow as pa

from asyncflow.operators.base import SourceOperator
from asyncflow.operators.tokenizer import CharTokenizer

ALPHABET = "0123456789+="


@dataclass(frozen=True)
class ArithmeticTask:
    max_operand: int = 99
    heldout_size: int = 500
    seed: int = 1234

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer(ALPHABET)

    @property
    def max_answer_tokens(self) -> int:
        return len(str(2 * self.max_operand)) + 1  # digits + eos

    @property
    def max_prompt_tokens(self) -> int:
        return 2 * len(str(self.max_operand)) + 3  # bos a + b =

    @cached_property
    def _heldout_codes(self) -> np.ndarray:
        n = (self.max_operand + 1) ** 2
        if self.heldout_size >= n:
            raise ValueError(f"heldout_size {self.heldout_size} leaves no training problems")
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(n, size=self.heldout_size, replace=False))

    def heldout(self) -> list[tuple[int, int]]:
        return [self._decode(c) for c in self._heldout_codes]

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """n training problems, drawn uniformly from everything outside the held-out set."""
        total = (self.max_operand + 1) ** 2
        codes = rng.integers(0, total - self.heldout_size, size=n)
        # shift each code past the held-out codes at or below it: a bijection onto the rest
        codes = codes + np.searchsorted(
            self._heldout_codes - np.arange(self.heldout_size), codes, side="right"
        )
        return [self._decode(int(c)) for c in codes]

    def _decode(self, code: int) -> tuple[int, int]:
        return divmod(int(code), self.max_operand + 1)

    def prompt(self, a: int, b: int) -> str:
        return f"{a}+{b}="

    def answer(self, a: int, b: int) -> str:
        return str(a + b)

    def encode_prompts(self, problems: Sequence[tuple[int, int]]) -> list[list[int]]:
        return [self.tokenizer.encode(self.prompt(a, b), bos=True) for a, b in problems]


def correct_sum(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_: object
) -> list[float]:
    """1.0 when the completion is exactly the expected sum, else 0.0 (TRL reward signature)."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


class ArithmeticPrompts(SourceOperator):
    """Source: each step, fresh training problems, each repeated `group_size` times.

    Rows of one problem share a `group_id` (unique across steps), which is what
    group-normalised advantages and group-preserving samplers key on.
    """

    writes: ClassVar = {"prompt_ids": "list<int32>", "answer": "string", "group_id": "int64"}

    def __init__(self, task: ArithmeticTask, group_size: int, seed: int = 0):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.task = task
        self.group_size = group_size
        self.seed = seed

    def produce(self, step: int, num_rows: int) -> pa.RecordBatch:
        if num_rows % self.group_size:
            raise ValueError(
                f"{num_rows} rows per step is not a multiple of group size {self.group_size}"
            )
        groups = num_rows // self.group_size
        rng = np.random.default_rng([self.seed, step])
        problems = self.task.sample(groups, rng)
        prompts = self.task.encode_prompts(problems)
        answers = [self.task.answer(a, b) for a, b in problems]
        repeat = np.repeat(np.arange(groups), self.group_size)
        return pa.record_batch(
            {
                "prompt_ids": pa.array([prompts[i] for i in repeat], pa.list_(pa.int32())),
                "answer": pa.array([answers[i] for i in repeat], pa.string()),
                "group_id": pa.array(step * groups + repeat, pa.int64()),
            }
        )
