"""PolicyUpdate: the actor's training step, fed micro-batch by micro-batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import torch

from asyncflow.operators.base import OperatorContext, WeightedOperator, Weights
from asyncflow.operators.generation import response_logprobs
from asyncflow.operators.losses import (
    LOSS_AGG_MODES,
    aggregate_terms,
    kl_estimate,
    ppo_clip_token_loss,
)
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.tensors import list_to_padded


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


class PolicyUpdate(WeightedOperator):
    """Clipped policy-gradient update with an optional KL penalty to a frozen reference.

    Each micro-batch adds the gradient of its loss *numerator*; `end_step` divides
    by the step's total denominator (tokens or rows, per `loss_agg_mode`) before the
    optimizer step. So streaming micro-batches of any size and token count gives
    exactly the update of one big batch, and no global batch size is needed up front.
    """

    writes: ClassVar = {}

    def __init__(
        self,
        model: ModelSpec,
        *,
        optim: OptimConfig = OptimConfig(),
        clip_eps: float = 0.2,
        loss_agg_mode: str = "token-mean",
        loss_norm_len: int | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        ref_column: str = "ref_logprob",
    ):
        if loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; one of {LOSS_AGG_MODES}")
        self.model_spec = model
        self.optim = optim
        self.clip_eps = clip_eps
        self.loss_agg_mode = loss_agg_mode
        self.loss_norm_len = loss_norm_len
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.ref_column = ref_column
        self.reads = {
            "prompt_ids": "list<int32>",
            "response_ids": "list<int32>",
            "rollout_logprob": "list<float32>",
            "advantage": "float32",
        }
        if kl_coef > 0:
            self.reads[ref_column] = "list<float32>"

    def setup(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.model = self.model_spec.build(seed=ctx.seed)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=self.optim.betas,
        )
        self.version = 0
        self._reset_step()

    def _reset_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._rows = 0
        self._tokens = 0.0
        self._denominator = 0.0
        self._sums: dict[str, float] = {}  # metric -> sum over tokens (or loss numerators)

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        self.model.train()
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        old, _ = list_to_padded(batch.column("rollout_logprob"), dtype=torch.float32)
        adv = torch.tensor(batch.column("advantage").to_numpy(zero_copy_only=False))

        logp = response_logprobs(self.model, prompt, prompt_mask, resp, mask)  # (B, R)
        token_loss, stats = ppo_clip_token_loss(logp, old, adv, self.clip_eps)
        pg_num, den = aggregate_terms(token_loss, mask, self.loss_agg_mode, self.loss_norm_len)
        numerator = pg_num
        m = mask.to(torch.float32)
        sums = {key: float((value * m).sum()) for key, value in stats.items()}
        sums["actor/pg_loss"] = float(pg_num.detach())
        if self.kl_coef > 0:
            ref, _ = list_to_padded(batch.column(self.ref_column), dtype=torch.float32)
            kl = kl_estimate(logp, ref, self.kl_estimator)  # (B, R)
            kl_num, _ = aggregate_terms(kl, mask, self.loss_agg_mode, self.loss_norm_len)
            numerator = numerator + self.kl_coef * kl_num
            sums["actor/kl"] = float((kl.detach() * m).sum())
        numerator.backward()

        self._rows += batch.num_rows
        self._tokens += float(m.sum())
        self._denominator += den
        for key, value in sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        return {}

    def end_step(self, step: int) -> dict[str, float]:
        if self._rows == 0:
            return {}
        scale = 1.0 / max(self._denominator, 1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.version += 1
        tokens = max(self._tokens, 1.0)
        metrics = {key: total / tokens for key, total in self._sums.items()}
        metrics["actor/pg_loss"] = self._sums["actor/pg_loss"] * scale
        metrics["actor/grad_norm"] = float(grad_norm)
        metrics["actor/rows"] = float(self._rows)
        metrics["actor/tokens"] = self._tokens
        self._reset_step()
        return metrics

    def get_weights(self) -> tuple[int, Weights]:
        return self.version, {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, version: int, weights: Weights) -> None:
        self.model.load_state_dict(weights)
        self.version = version
