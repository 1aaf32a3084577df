"""Supervised fine-tuning on (prompt, response) token pairs: the warm start RL builds on.

`sft_train` is a plain loop over an example source; `SFTUpdate` is the same loss as
an operator fed micro-batches, with the trainers' exact accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import pyarrow as pa
import torch

from asyncflow.operators.checks import require_nonempty
from asyncflow.operators.generation import response_logprobs
from asyncflow.operators.losses import aggregate_terms, check_agg_mode, masked_mean
from asyncflow.operators.model import CausalLM
from asyncflow.operators.policy import ModelBuilder
from asyncflow.operators.tensors import list_to_padded, sequences_to_list
from asyncflow.operators.training import AccumulatingTrainer, OptimConfig

SFT_OPTIM = OptimConfig(lr=3e-3)  # the warm start's learning rate

ExampleSource = Callable[[int], tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]]


def sft_train(
    model: CausalLM,
    examples: ExampleSource,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    log: Callable[[int, float], None] | None = None,
) -> float:
    """Next-token cross-entropy on response tokens only; returns the last loss.

    `examples(step)` returns that step's prompts and target responses, so the
    caller owns the data order and its seeding.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        prompts, responses = examples(step)
        prompt, prompt_mask = list_to_padded(sequences_to_list(prompts), dtype=torch.long)
        resp, resp_mask = list_to_padded(sequences_to_list(responses), dtype=torch.long)
        loss = -masked_mean(
            response_logprobs(model, prompt, prompt_mask, resp, resp_mask), resp_mask
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if log is not None:
            log(step, loss_value)
    model.eval()
    return loss_value


class SFTUpdate(AccumulatingTrainer):
    """Next-token cross-entropy on response tokens, -log pi(y_t | x, y_<t), as an operator.

    Each micro-batch back-propagates its loss numerator; `end_step` divides by the
    step's denominator (tokens for token-mean) and steps, as `PolicyUpdate` does.
    """

    reads: ClassVar = {"prompt_ids": "list<int32>", "response_ids": "list<int32>"}
    writes: ClassVar = {}
    metric_prefix: ClassVar[str] = "sft"
    loss_metric: ClassVar[str] = "loss"

    def __init__(
        self,
        model: ModelBuilder,
        *,
        optim: OptimConfig = SFT_OPTIM,
        loss_agg_mode: str = "token-mean",
        loss_norm_len: int | None = None,
    ):
        check_agg_mode(loss_agg_mode)
        self.model_spec = model
        self.optim = optim
        self.loss_agg_mode = loss_agg_mode
        self.loss_norm_len = loss_norm_len

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        require_nonempty(self.operator_name, batch, "prompt_ids", "a response needs a prompt")
        self.model.train()
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        nll = -response_logprobs(self.model, prompt, prompt_mask, resp, mask)  # (B, R)
        num, den = aggregate_terms(nll, mask, self.loss_agg_mode, self.loss_norm_len)
        self._accumulate(num, den, num, rows=batch.num_rows, mask=mask, token_stats={})
        return {}
