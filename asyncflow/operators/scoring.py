"""Scoring operators: log-probs under a (frozen) model, rule/verifier rewards, a reward
model, and the critic's values."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar, Protocol

import numpy as np
import pyarrow as pa
import torch

from asyncflow.errors import OperatorError
from asyncflow.operators.base import Operator
from asyncflow.operators.checks import require_nonempty, sample_ids
from asyncflow.operators.generation import response_logprobs
from asyncflow.operators.heads import HeadSpec
from asyncflow.operators.policy import ModelBuilder
from asyncflow.operators.tensors import list_to_padded, padded_to_list
from asyncflow.operators.training import ModelOperator

RewardFn = Callable[..., Sequence[float]]  # TRL signature: f(prompts, completions, **columns)


class TextDecoder(Protocol):
    """What `Reward` needs of a tokenizer (`CharTokenizer`, `hf.HFTokenizer`)."""

    def decode(self, ids: Iterable[int]) -> str: ...  # text up to the first eos


class LogProb(ModelOperator):
    """Per-token log-probs of each response under this operator's model (e.g. the reference,
    or the proximal policy of decoupled PPO when it holds the trainer's weights).

    `entropy_output` names an optional extra column with the per-token entropy.
    """

    reads: ClassVar = {"prompt_ids": "list<int32>", "response_ids": "list<int32>"}

    def __init__(
        self,
        model: ModelBuilder,
        output: str = "ref_logprob",
        *,
        temperature: float = 1.0,
        entropy_output: str | None = None,
    ):
        self.model_spec = model
        self.output = output
        self.temperature = temperature
        self.entropy_output = entropy_output
        self.writes = {output: "list<float32>"}
        if entropy_output is not None:
            self.writes[entropy_output] = "list<float32>"

    @torch.no_grad()
    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        require_nonempty(self.operator_name, batch, "prompt_ids", "a response needs a prompt")
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, resp_mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        want_entropy = self.entropy_output is not None
        out = response_logprobs(
            self.model,
            prompt,
            prompt_mask,
            resp,
            resp_mask,
            self.temperature,
            return_entropy=want_entropy,
        )
        logp, entropy = out if want_entropy else (out, None)
        result = {self.output: padded_to_list(logp, resp_mask, value_type=pa.float32())}
        if entropy is not None:
            result[self.entropy_output] = padded_to_list(
                entropy, resp_mask, value_type=pa.float32()
            )
        return result


class Reward(Operator):
    """Weighted sum of reward functions with TRL's signature, so users bring theirs unchanged.

    Each function also gets its own output column (its name), so e.g. a verifier's
    0/1 score is reported as accuracy next to a shaped total reward.
    """

    def __init__(
        self,
        functions: Mapping[str, RewardFn],
        tokenizer: TextDecoder,
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
        # An empty response decodes to "": reward functions are called with it like any other.
        prompts = [self.tokenizer.decode(p) for p in batch.column("prompt_ids").to_pylist()]
        completions = [self.tokenizer.decode(r) for r in batch.column("response_ids").to_pylist()]
        columns = {name: batch.column(name).to_pylist() for name in self.extra_columns}
        ids = sample_ids(batch)
        total = np.zeros(len(prompts), dtype=np.float32)
        out: dict[str, pa.Array] = {}
        for name, fn in self.functions.items():
            try:
                scores = list(fn(prompts, completions, **columns))
            except Exception as exc:
                raise OperatorError(
                    self.operator_name, f"reward function {name!r} raised {exc!r}", ids
                ) from exc
            if len(scores) != len(prompts):
                raise OperatorError(
                    self.operator_name,
                    f"reward function {name!r} returned {len(scores)} scores for "
                    f"{len(prompts)} completions",
                    ids,
                )
            bad = [ids[i] for i, s in enumerate(scores) if not _is_finite_number(s)]
            if bad:
                raise OperatorError(
                    self.operator_name, f"reward function {name!r} gave NaN/inf", bad
                )
            arr = np.asarray(scores, dtype=np.float32)
            total += self.weights[name] * arr
            out[name] = pa.array(arr, pa.float32())
        return {"reward": pa.array(total, pa.float32()), **out}


def _is_finite_number(x: object) -> bool:
    try:
        return math.isfinite(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


class ModelReward(ModelOperator):
    """Scores each (prompt, response) with a reward model (`HeadSpec(kind="reward")`):
    an LM trunk with a linear head read at the last real token."""

    reads: ClassVar = {"prompt_ids": "list<int32>", "response_ids": "list<int32>"}

    def __init__(self, model: HeadSpec, output: str = "reward"):
        if model.kind != "reward":
            raise ValueError(f"ModelReward needs a reward head, got kind={model.kind!r}")
        self.model_spec = model
        self.output = output
        self.writes = {output: "float32"}

    @torch.no_grad()
    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        require_nonempty(self.operator_name, batch, "prompt_ids", "the reward model reads a prompt")
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, resp_mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        scores = self.model(prompt, prompt_mask, resp, resp_mask)  # (B,)
        bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
        if bad:
            raise OperatorError(
                self.operator_name, "reward model gave NaN/inf", sample_ids(batch, bad)
            )
        return {self.output: pa.array(scores.float().numpy(), pa.float32())}


class Values(ModelOperator):
    """The critic's V(s_t) per response token (`HeadSpec(kind="value")`), for GAE and
    as V_old of the clipped value loss. Receives weights from `CriticUpdate`."""

    reads: ClassVar = {"prompt_ids": "list<int32>", "response_ids": "list<int32>"}
    writes: ClassVar = {"values": "list<float32>"}

    def __init__(self, critic: HeadSpec):
        if critic.kind != "value":
            raise ValueError(f"Values needs a value head, got kind={critic.kind!r}")
        self.model_spec = critic

    @torch.no_grad()
    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        require_nonempty(self.operator_name, batch, "prompt_ids", "the critic reads a prompt")
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, resp_mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        values = self.model(prompt, prompt_mask, resp, resp_mask)  # (B, R)
        return {"values": padded_to_list(values, resp_mask, value_type=pa.float32())}
