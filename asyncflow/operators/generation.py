"""Batched sampling with a KV cache, and per-token log-probs of given responses.

Both functions take and return ragged Python/torch data so the operators above
them stay about columns; the padding rules live in `tensors.py` and here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asyncflow.operators.model import CausalLM


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 8
    temperature: float = 1.0  # 0 = greedy
    eos_id: int = 2
    pad_id: int = 0


@dataclass
class Generation:
    responses: list[list[int]]  # ragged; ends with eos unless cut by max_new_tokens
    logprobs: list[list[float]]  # log-prob of each response token under the sampling policy


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> Generation:
    """Sample continuations of ragged prompts, decoding one token per step with a KV cache."""
    model.eval()
    B = len(prompts)
    if B == 0:
        return Generation([], [])
    width = max(len(p) for p in prompts)
    input_ids = torch.full((B, width), params.pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left-pad so every row's next token is in the last column
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        input_ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1

    logits, past = model(input_ids, mask)
    tokens = torch.empty((B, params.max_new_tokens), dtype=torch.long)
    token_logprobs = torch.zeros((B, params.max_new_tokens))
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.full((B,), params.max_new_tokens, dtype=torch.long)
    for t in range(params.max_new_tokens):
        step_logits = logits[:, -1, :]  # (B, V)
        if params.temperature > 0:
            logp = F.log_softmax(step_logits / params.temperature, dim=-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B,)
        else:
            logp = F.log_softmax(step_logits, dim=-1)
            nxt = step_logits.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, params.pad_id), nxt)
        tokens[:, t] = nxt
        token_logprobs[:, t] = logp.gather(1, nxt[:, None]).squeeze(1)
        finished_now = ~done & (nxt == params.eos_id)
        lengths[finished_now] = t + 1
        done |= finished_now
        if bool(done.all()) or t == params.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
        logits, past = model(nxt[:, None], mask, past)

    responses = [tokens[i, : lengths[i]].tolist() for i in range(B)]
    logprobs = [token_logprobs[i, : lengths[i]].tolist() for i in range(B)]
    return Generation(responses, logprobs)


def response_logprobs(
    model: CausalLM,
    prompt_ids: torch.Tensor,  # (B, P) left-aligned, right-padded
    prompt_mask: torch.Tensor,  # (B, P) bool
    response_ids: torch.Tensor,  # (B, R) right-padded
    response_mask: torch.Tensor,  # (B, R) bool
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs (B, R) of each response token given its prompt; 0 at padding.

    Rows are packed as prompt+response with padding only at the end, so
    positions match what generation used. Gradients flow when called in grad mode.
    """
    B = prompt_ids.shape[0]
    p_len = prompt_mask.sum(dim=1)  # (B,)
    r_len = response_mask.sum(dim=1)
    total = p_len + r_len
    width = int(total.max())
    seq = torch.zeros((B, width), dtype=torch.long)
    cols = torch.arange(width)[None, :]  # (1, W)
    in_prompt = cols < p_len[:, None]
    in_resp = (cols >= p_len[:, None]) & (cols < total[:, None])
    seq[in_prompt] = prompt_ids[prompt_mask].long()
    seq[in_resp] = response_ids[response_mask].long()
    attn = (cols < total[:, None]).long()

    logits, _ = model(seq, attn)  # (B, W, V)
    # logits at column j predict token j+1: response token k sits at p_len+k, predicted at p_len+k-1
    R = response_ids.shape[1]
    gather_at = (p_len[:, None] - 1 + torch.arange(R)[None, :]).clamp(max=width - 1)  # (B, R)
    step_logits = logits.gather(1, gather_at[:, :, None].expand(-1, -1, logits.shape[-1]))
    logp = F.log_softmax(step_logits.float() / temperature, dim=-1)
    token_logp = logp.gather(2, response_ids.long().clamp(min=0)[:, :, None]).squeeze(2)
    return token_logp * response_mask
