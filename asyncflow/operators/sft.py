"""Supervised fine-tuning on (prompt, response) token pairs: the warm start RL builds on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from asyncflow.operators.generation import response_logprobs
from asyncflow.operators.losses import masked_mean
from asyncflow.operators.model import CausalLM
from asyncflow.operators.tensors import list_to_padded, sequences_to_list

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
