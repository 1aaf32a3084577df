"""Scoring operators: log-probs under a (frozen) model, and rule/verifier rewards."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from asyncflow.errors import OperatorError
from asyncflow.operators.base import Operator, OperatorContext, WeightedOperator, Weights
from asyncflow.operators.generation import response_logprobs
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.tensors import list_to_padded, padded_to_list
from asyncflow.operators.tokenizer import CharTokenizer

RewardFn = Callable[..., Sequence[float]]  # TRL signature: f(prompts, completions, **columns)


class LogProb(WeightedOperator):
    """Per-token log-probs of each response under this operator's model (e.g. the reference)."""

    reads: ClassVar = {"prompt_ids": "list<int32>", "response_ids": "list<int32>"}

    def __init__(self, model: ModelSpec, output: str = "ref_logprob"):
        self.model_spec = model
        self.output = output
        self.writes = {output: "list<float32>"}

    def setup(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.model = self.model_spec.build(seed=ctx.seed).eval()
        self.version = 0

    @torch.no_grad()
    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, resp_mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        logp = response_logprobs(self.model, prompt, prompt_mask, resp, resp_mask)
        return {self.output: padded_to_list(logp, resp_mask, value_type=pa.float32())}

    def get_weights(self) -> tuple[int, Weights]:
        return self.version, dict(self.model.state_dict())

    def set_weights(self, version: int, weights: Weights) -> None:
        self.model.load_state_dict(weights)
        self.version = version


class Reward(Operator):
    """Weighted sum of reward functions with TRL's signature, so users bring theirs unchanged.

    Each function also gets its own output column (its name), so e.g. a verifier's
    0/1 score is reported as accuracy next to a shaped total reward.
    """

    def __init__(
        self,
        functions: Mapping[str, RewardFn],
        tokenizer: CharTokenizer,
        *,
        weights: Mapping[str, float] | None = None,
        extra_columns: Mapping[str, str | None] | None = None,
    ):
        if not functions:
            raise ValueError("Reward needs at least one reward function")
        self.functions = dict(functions)
        self.weights = {name: 1.0 for name in functions} | dict(weights or {})
        self.tokenizer = tokenizer
        self.extra_columns = dict(extra_columns or {})
        self.reads = {
            "prompt_ids": "list<int32>",
            "response_ids": "list<int32>",
            **self.extra_columns,
        }
        self.writes = {"reward": "float32", **{name: "float32" for name in self.functions}}

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        prompts = [self.tokenizer.decode(p) for p in batch.column("prompt_ids").to_pylist()]
        completions = [self.tokenizer.decode(r) for r in batch.column("response_ids").to_pylist()]
        columns = {name: batch.column(name).to_pylist() for name in self.extra_columns}
        ids = batch.column("sample_id").to_pylist() if "sample_id" in batch.schema.names else []
        total = np.zeros(len(prompts), dtype=np.float32)
        out: dict[str, pa.Array] = {}
        for name, fn in self.functions.items():
            scores = list(fn(prompts, completions, **columns))
            if len(scores) != len(prompts):
                raise OperatorError(
                    self.ctx.name,
                    f"reward function {name!r} returned {len(scores)} scores for "
                    f"{len(prompts)} completions",
                    ids,
                )
            bad = [ids[i] if ids else i for i, s in enumerate(scores) if not math.isfinite(s)]
            if bad:
                raise OperatorError(self.ctx.name, f"reward function {name!r} gave NaN/inf", bad)
            arr = np.asarray(scores, dtype=np.float32)
            total += self.weights[name] * arr
            out[name] = pa.array(arr, pa.float32())
        return {"reward": pa.array(total, pa.float32()), **out}
