"""Trainers fed micro-batch by micro-batch: PolicyUpdate (the actor) and CriticUpdate.

Both follow `training.AccumulatingTrainer`: each micro-batch back-propagates its
loss numerator, `end_step` divides by the step's denominator and steps AdamW.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import torch

from asyncflow.operators.checks import require_finite, require_same_lengths
from asyncflow.operators.generation import response_logprobs
from asyncflow.operators.heads import HeadSpec
from asyncflow.operators.losses import (
    IS_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate_terms,
    check_agg_mode,
    kl_estimate,
    value_clip_token_loss,
)
from asyncflow.operators.policy import ModelBuilder
from asyncflow.operators.tensors import list_to_padded
from asyncflow.operators.training import DEFAULT_OPTIM, AccumulatingTrainer, OptimConfig

__all__ = ["CriticUpdate", "OptimConfig", "PolicyUpdate"]


class PolicyUpdate(AccumulatingTrainer):
    """Clipped policy-gradient update, with optional KL penalty to a frozen reference,
    entropy bonus, dual-clip, and decoupled PPO for stale samples.

    The policy loss comes from `losses.POLICY_LOSSES[policy_loss]`, whose recorded
    inputs decide the columns read: "ppo" reads `rollout_logprob` as the old policy;
    "decoupled_ppo" clips against `prox_logprob` (recomputed by a `LogProb` with the
    trainer's weights) and weights the loss by min(pi_prox / pi_behav, is_cap), with
    `rollout_logprob` as the behaviour policy. Advantages are one float per sample
    (`advantage`) or, with `token_advantages=True`, one per response token
    (`advantages`, e.g. from `GAEAdvantage`).
    """

    writes: ClassVar = {}
    metric_prefix: ClassVar[str] = "actor"
    loss_metric: ClassVar[str] = "pg_loss"

    def __init__(
        self,
        model: ModelBuilder,
        *,
        optim: OptimConfig = DEFAULT_OPTIM,
        clip_eps: float = 0.2,
        loss_agg_mode: str = "token-mean",
        loss_norm_len: int | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        ref_column: str = "ref_logprob",
        clip_eps_high: float | None = None,  # DAPO clip-higher; None = clip_eps
        clip_ratio_c: float | None = None,  # dual-clip bound for A < 0, e.g. 3.0; None = off
        entropy_coef: float = 0.0,  # > 0 subtracts entropy_coef * entropy from the loss
        policy_loss: str = "ppo",  # a key of losses.POLICY_LOSSES
        is_cap: float = 2.0,  # decoupled_ppo: cap of the behaviour importance weight
        is_mode: str = "truncate",  # decoupled_ppo: "truncate" (min) or "mask" (AReaL)
        prox_column: str = "prox_logprob",
        token_advantages: bool = False,
        temperature: float = 1.0,  # the sampling temperature the log-probs are taken at
    ):
        check_agg_mode(loss_agg_mode)
        if policy_loss not in POLICY_LOSSES:
            raise ValueError(f"unknown policy_loss {policy_loss!r}; one of {list(POLICY_LOSSES)}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; one of {list(KL_ESTIMATORS)}")
        if is_mode not in IS_MODES:
            raise ValueError(f"unknown is_mode {is_mode!r}; one of {IS_MODES}")
        if clip_ratio_c is not None and clip_ratio_c <= 1.0:
            raise ValueError(f"dual-clip needs clip_ratio_c > 1, got {clip_ratio_c}")
        self.model_spec = model
        self.optim = optim
        self.clip_eps = clip_eps
        self.loss_agg_mode = loss_agg_mode
        self.loss_norm_len = loss_norm_len
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.ref_column = ref_column
        self.entropy_coef = entropy_coef
        self.policy_loss = policy_loss
        self.token_advantages = token_advantages
        self.temperature = temperature
        spec = POLICY_LOSSES[policy_loss]
        options = {
            "clip_eps": clip_eps,
            "clip_eps_high": clip_eps_high,
            "clip_ratio_c": clip_ratio_c,
            "is_cap": is_cap,
            "is_mode": is_mode,
        }
        self.loss_options = {k: options[k] for k in spec.options}
        # loss input -> column; the behaviour/old policy is always the rollout's log-probs
        columns = {"old_logprob": "rollout_logprob", "behav_logprob": "rollout_logprob"}
        self.loss_columns = {name: columns.get(name, prox_column) for name in spec.inputs}
        self.advantage_column = "advantages" if token_advantages else "advantage"
        self.reads = {
            "prompt_ids": "list<int32>",
            "response_ids": "list<int32>",
            "rollout_logprob": "list<float32>",
            **{column: "list<float32>" for column in self.loss_columns.values()},
            self.advantage_column: "list<float32>" if token_advantages else "float32",
        }
        if kl_coef > 0:
            self.reads[ref_column] = "list<float32>"

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        per_token = [c for c, t in self.reads.items() if t == "list<float32>"]
        require_same_lengths(self.operator_name, batch, "response_ids", per_token)
        require_finite(self.operator_name, batch, [*per_token, self.advantage_column])
        self.model.train()
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        column = batch.column(self.advantage_column)
        if self.token_advantages:
            adv, _ = list_to_padded(column, dtype=torch.float32)
        else:
            adv = torch.tensor(column.to_numpy(zero_copy_only=False), dtype=torch.float32)
        inputs = {
            name: list_to_padded(batch.column(col), dtype=torch.float32)[0]
            for name, col in self.loss_columns.items()
        }

        want_entropy = self.entropy_coef > 0
        out = response_logprobs(
            self.model,
            prompt,
            prompt_mask,
            resp,
            mask,
            self.temperature,
            return_entropy=want_entropy,
        )
        logp, entropy = out if want_entropy else (out, None)  # (B, R)
        spec = POLICY_LOSSES[self.policy_loss]
        token_loss, stats = spec.fn(logprob=logp, advantages=adv, **inputs, **self.loss_options)
        pg_num, den = aggregate_terms(token_loss, mask, self.loss_agg_mode, self.loss_norm_len)
        numerator = pg_num
        if self.kl_coef > 0:
            ref, _ = list_to_padded(batch.column(self.ref_column), dtype=torch.float32)
            kl = kl_estimate(logp, ref, self.kl_estimator)  # (B, R)
            kl_num, _ = aggregate_terms(kl, mask, self.loss_agg_mode, self.loss_norm_len)
            numerator = numerator + self.kl_coef * kl_num
            stats["actor/kl"] = kl
        if entropy is not None:
            ent_num, _ = aggregate_terms(entropy, mask, self.loss_agg_mode, self.loss_norm_len)
            numerator = numerator - self.entropy_coef * ent_num
            stats["actor/entropy"] = entropy
        self._accumulate(numerator, den, pg_num, rows=batch.num_rows, mask=mask, token_stats=stats)
        return {}


class CriticUpdate(AccumulatingTrainer):
    """Fits the critic V(s_t) to `returns` with PPO's clipped value loss.

    Reads the values the rollout was scored with (`values`, from `Values`) as V_old
    and the targets `returns` (from `GAEAdvantage`); sync its weights to `Values`.
    """

    writes: ClassVar = {}
    reads: ClassVar = {
        "prompt_ids": "list<int32>",
        "response_ids": "list<int32>",
        "values": "list<float32>",
        "returns": "list<float32>",
    }
    metric_prefix: ClassVar[str] = "critic"
    loss_metric: ClassVar[str] = "vf_loss"

    def __init__(
        self,
        critic: HeadSpec,
        *,
        optim: OptimConfig = DEFAULT_OPTIM,
        value_clip: float | None = 0.2,  # None = unclipped (V - R)^2 / 2
        loss_agg_mode: str = "token-mean",
        loss_norm_len: int | None = None,
    ):
        check_agg_mode(loss_agg_mode)
        if critic.kind != "value":
            raise ValueError(f"CriticUpdate needs a value head, got kind={critic.kind!r}")
        self.model_spec = critic
        self.optim = optim
        self.value_clip = value_clip
        self.loss_agg_mode = loss_agg_mode
        self.loss_norm_len = loss_norm_len

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        require_same_lengths(self.operator_name, batch, "response_ids", ["values", "returns"])
        require_finite(self.operator_name, batch, ["values", "returns"])
        self.model.train()
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        old_values, _ = list_to_padded(batch.column("values"), dtype=torch.float32)
        returns, _ = list_to_padded(batch.column("returns"), dtype=torch.float32)
        values = self.model(prompt, prompt_mask, resp, mask)  # (B, R)
        token_loss, stats = value_clip_token_loss(values, old_values, returns, self.value_clip)
        num, den = aggregate_terms(token_loss, mask, self.loss_agg_mode, self.loss_norm_len)
        self._accumulate(num, den, num, rows=batch.num_rows, mask=mask, token_stats=stats)
        return {}
