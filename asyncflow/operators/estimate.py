"""Advantage operators: turn rewards (and critic values) into advantages.

`GroupAdvantage` writes one advantage per sample from any per-sequence estimator
of `advantages.ADVANTAGE_ESTIMATORS`; `GAEAdvantage` writes per-token advantages
and returns for PPO with a critic. The columns each reads follow from the
estimator's recorded inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pyarrow as pa
import torch

from asyncflow.operators.advantages import (
    ADVANTAGE_ESTIMATORS,
    kl_penalized_rewards,
    masked_whiten,
    outcome_token_rewards,
)
from asyncflow.operators.base import Operator
from asyncflow.operators.checks import require_finite, require_same_lengths
from asyncflow.operators.losses import KL_ESTIMATORS
from asyncflow.operators.tensors import list_to_padded, padded_to_list

SEQUENCE_ESTIMATORS = tuple(k for k, e in ADVANTAGE_ESTIMATORS.items() if not e.per_token)


class GroupAdvantage(Operator):
    """One advantage per sample: GRPO (default), Dr.GRPO, RLOO, REINFORCE++(-baseline).

    `normalize_std=False` with the default estimator is Dr.GRPO, as before.
    REINFORCE++ whitens over the tokens of the micro-batch it is given (verl: the
    whole step's batch), so it reads `response_ids` for the token counts.
    """

    writes: ClassVar = {"advantage": "float32"}

    def __init__(
        self,
        normalize_std: bool = True,
        eps: float = 1e-6,
        *,
        estimator: str = "grpo",
        options: Mapping[str, float] | None = None,
    ):
        if estimator == "grpo" and not normalize_std:
            estimator = "drgrpo"
        if estimator not in SEQUENCE_ESTIMATORS:
            hint = " (per-token: use GAEAdvantage)" if estimator in ADVANTAGE_ESTIMATORS else ""
            raise ValueError(
                f"unknown per-sample estimator {estimator!r}{hint}; "
                f"choose one of {', '.join(SEQUENCE_ESTIMATORS)}"
            )
        spec = ADVANTAGE_ESTIMATORS[estimator]
        self.options = dict(options or {})
        if "eps" in spec.options:
            self.options.setdefault("eps", eps)
        unknown = sorted(set(self.options) - set(spec.options))
        if unknown:
            raise ValueError(
                f"estimator {estimator!r} takes options {list(spec.options)}, not {unknown}"
            )
        self.estimator = estimator
        self.normalize_std = normalize_std
        self.eps = eps
        self.reads = {"reward": "float32"}
        if "group_ids" in spec.inputs:
            self.reads["group_id"] = "int64"
        if spec.uses_lengths:
            self.reads["response_ids"] = "list<int32>"
        self.needs_whole_groups = "group_ids" in spec.inputs

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        require_finite(self.operator_name, batch, ["reward"])
        spec = ADVANTAGE_ESTIMATORS[self.estimator]
        rewards = torch.tensor(batch.column("reward").to_numpy(zero_copy_only=False))
        if spec.uses_lengths:
            _, mask = list_to_padded(batch.column("response_ids"))
        else:  # one stand-in token per row: the values do not depend on lengths
            mask = torch.ones(batch.num_rows, 1, dtype=torch.bool)
        available = {
            "rewards": lambda: rewards,
            "group_ids": lambda: torch.tensor(
                batch.column("group_id").to_numpy(zero_copy_only=False)
            ),
            "mask": lambda: mask,
            "token_rewards": lambda: outcome_token_rewards(rewards, mask),
        }
        inputs = {name: available[name]() for name in spec.inputs}
        adv, _ = spec.fn(**inputs, **self.options)  # (B, T), constant along each response
        m = mask.to(torch.float32)
        per_sample = (adv * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # 0 for empty responses
        return {"advantage": pa.array(per_sample.numpy(), pa.float32())}


class GAEAdvantage(Operator):
    """Per-token GAE advantages and returns for PPO with a critic.

    The outcome `reward` sits at each response's last real token; with `kl_coef > 0`
    the per-token KL penalty (`rollout_logprob` vs `ref_logprob`) is subtracted from
    the token rewards first. `whiten=True` normalises advantages over the micro-batch's
    tokens (verl does it over the step's batch).
    """

    writes: ClassVar = {"advantages": "list<float32>", "returns": "list<float32>"}

    def __init__(
        self,
        gamma: float = 1.0,
        lam: float = 0.95,
        *,
        kl_coef: float = 0.0,
        kl_estimator: str = "k1",
        logprob_column: str = "rollout_logprob",
        ref_column: str = "ref_logprob",
        whiten: bool = False,
    ):
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; one of {list(KL_ESTIMATORS)}")
        self.gamma, self.lam = gamma, lam
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.logprob_column, self.ref_column = logprob_column, ref_column
        self.whiten = whiten
        self.reads = {
            "reward": "float32",
            "values": "list<float32>",
            "response_ids": "list<int32>",
        }
        if kl_coef > 0:
            self.reads |= {logprob_column: "list<float32>", ref_column: "list<float32>"}

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        per_token = [c for c, t in self.reads.items() if t == "list<float32>"]
        require_same_lengths(self.operator_name, batch, "response_ids", per_token)
        require_finite(self.operator_name, batch, ["reward", *per_token])
        rewards = torch.tensor(batch.column("reward").to_numpy(zero_copy_only=False))
        values, mask = list_to_padded(batch.column("values"), dtype=torch.float32)
        token_rewards = outcome_token_rewards(rewards, mask)  # (B, T)
        if self.kl_coef > 0:
            logp, _ = list_to_padded(batch.column(self.logprob_column), dtype=torch.float32)
            ref, _ = list_to_padded(batch.column(self.ref_column), dtype=torch.float32)
            token_rewards, _ = kl_penalized_rewards(
                token_rewards, logp, ref, mask, self.kl_coef, self.kl_estimator
            )
        gae = ADVANTAGE_ESTIMATORS["gae"]
        adv, returns = gae.fn(
            token_rewards=token_rewards, values=values, mask=mask, gamma=self.gamma, lam=self.lam
        )
        if self.whiten:
            adv = masked_whiten(adv, mask)
        return {
            "advantages": padded_to_list(adv, mask, value_type=pa.float32()),
            "returns": padded_to_list(returns, mask, value_type=pa.float32()),
        }
