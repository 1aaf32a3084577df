"""PolicyUpdate: the actor's training step, fed micro-batch by micro-batch.

Gradients accumulate over the micro-batches of a global step (each scaled by its
share of the global batch) and the optimizer steps once in `end_step`, so the
update is the same whether the batch arrived at once or streamed in pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import torch

from asyncflow.operators.base import OperatorContext, WeightedOperator, Weights
from asyncflow.operators.generation import response_logprobs
from asyncflow.operators.losses import kl_estimate, masked_mean, ppo_clip_loss
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.tensors import list_to_padded


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


class PolicyUpdate(WeightedOperator):
    """Clipped policy-gradient update with an optional KL penalty to a frozen reference."""

    writes: ClassVar = {}

    def __init__(
        self,
        model: ModelSpec,
        *,
        global_batch_size: int,
        optim: OptimConfig = OptimConfig(),
        clip_eps: float = 0.2,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        ref_column: str = "ref_logprob",
    ):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.model_spec = model
        self.global_batch_size = global_batch_size
        self.optim = optim
        self.clip_eps = clip_eps
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
        self._sums: dict[str, float] = {}

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        self.model.train()
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        old, _ = list_to_padded(batch.column("rollout_logprob"), dtype=torch.float32)
        adv = torch.tensor(batch.column("advantage").to_numpy(zero_copy_only=False))

        logp = response_logprobs(self.model, prompt, prompt_mask, resp, mask)  # (B, R)
        loss, metrics = ppo_clip_loss(logp, old, adv, mask, self.clip_eps)
        metrics["actor/pg_loss"] = loss.detach()
        if self.kl_coef > 0:
            ref, _ = list_to_padded(batch.column(self.ref_column), dtype=torch.float32)
            kl = masked_mean(kl_estimate(logp, ref, self.kl_estimator), mask)
            loss = loss + self.kl_coef * kl
            metrics["actor/kl"] = kl.detach()
        share = batch.num_rows / self.global_batch_size
        (loss * share).backward()

        self._rows += batch.num_rows
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * batch.num_rows
        return {}

    def end_step(self, step: int) -> dict[str, float]:
        if self._rows == 0:
            return {}
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.optim.grad_clip if self.optim.grad_clip > 0 else 1e12
        )
        self.optimizer.step()
        self.version += 1
        metrics = {key: total / self._rows for key, total in self._sums.items()}
        metrics["actor/grad_norm"] = float(grad_norm)
        metrics["actor/rows"] = float(self._rows)
        self._reset_step()
        return metrics

    def get_weights(self) -> tuple[int, Weights]:
        return self.version, {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, version: int, weights: Weights) -> None:
        self.model.load_state_dict(weights)
        self.version = version
