"""Batched sampling with a KV cache, and per-token log-probs of given responses.

Both functions take and return ragged Python/torch data so the operators above
them stay about columns; the padding rules live in `tensors.py` and here. Any
model satisfying `model.CausalLMLike` works: the native `CausalLM` or a
`transformers` model through `hf.HFCausalLM`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from asyncflow.operators.model import CausalLMLike


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 8
    temperature: float = 1.0  # 0 = greedy
    eos_id: int = 2
    pad_id: int = 0
    top_k: int = 0  # sample among the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # nucleus: the fewest most-likely tokens with mass >= top_p; 1 = all
    n: int = 1  # samples per prompt, returned grouped: prompt 0 x n, prompt 1 x n, ...
    # Log-probs (and entropies) reported per token are those of the tempered policy, which
    # is what `response_logprobs(temperature=...)` recomputes, so PPO ratios start at 1.
    # True reports the top-k/top-p renormalised distribution actually sampled from instead.
    truncated_logprobs: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            problems.append(f"n (samples per prompt) must be >= 1, got {self.n}")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))


@dataclass
class Generation:
    responses: list[list[int]]  # ragged; ends with eos unless cut by max_new_tokens
    logprobs: list[list[float]]  # log-prob of each response token under the sampling policy
    entropies: list[list[float]] | None = None  # per-token entropy, when asked for


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and then the top-p nucleus to -inf; (B, V) -> (B, V).

    top-k keeps every token tied with the k-th largest logit. top-p keeps the most
    likely tokens until their probability mass reaches `top_p` (always at least one).
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 < top_p: kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p log p over the last dim; tokens with p = 0 (logp = -inf) add 0."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(logp)).sum(dim=-1)


# --- per-row random streams ----------------------------------------------------------------
# A row's sampling randomness is a SplitMix64 stream keyed by that row alone: the uniform
# for its t-th new token is mix64(key + (t + 1) * GOLDEN). So a row's tokens depend on its
# key, its prompt and the weights, never on which other rows share its micro-batch, which
# replica ran it, or in which order. Counter-based, so a whole (rows x tokens) matrix of
# uniforms costs a few vectorised numpy operations (microseconds), not a generator per row.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (multiplication wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_seeds(run_seed: int, row_ids: Iterable[int]) -> list[int]:
    """64-bit stream keys for rows: a hash of (run seed, row id), e.g. the sample id, which
    is unique per row across a run. Hashing (not adding) keeps neighbouring ids' streams
    apart."""
    return [
        int.from_bytes(
            hashlib.blake2b(f"{int(run_seed)}:{int(i)}".encode(), digest_size=8).digest(), "little"
        )
        for i in row_ids
    ]


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(len(seeds), steps) float64 uniforms in [0, 1): row i's stream, tokens 0..steps-1."""
    keys = np.array([int(s) & _MASK64 for s in seeds], dtype=np.uint64)
    counters = np.arange(1, steps + 1, dtype=np.uint64) * _GOLDEN
    z = _mix64(keys[:, None] + counters[None, :])
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def _sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from probs (B, V), given one uniform per row u (B,) in [0, 1).

    The token is the first whose cumulative mass exceeds u * total: tokens of
    probability 0 (filtered by top-k/top-p) have an empty interval and are never chosen.
    """
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    x = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(1)  # (B,)
    V = probs.shape[-1]
    over = idx >= V  # only when rounding put x on the total: take the last possible token
    if bool(over.any()):
        last = V - 1 - (probs > 0).flip(-1).long().argmax(dim=-1)
        idx = torch.where(over, last, idx)
    return idx


@torch.no_grad()
def generate(
    model: CausalLMLike,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    return_entropy: bool = False,
    seeds: Sequence[int] | None = None,
) -> Generation:
    """Sample continuations of ragged prompts, decoding one token per step with a KV cache.

    With `params.n > 1` each prompt is sampled n times and the rows come back
    grouped (prompt 0 x n, then prompt 1 x n, ...). The same generator seed, prompts
    and weights give the same tokens.

    `seeds` (one 64-bit key per returned row, e.g. from `row_seeds`) gives every row
    its own random stream instead of sharing `generator`: a row's tokens then depend
    on its key, prompt and the weights only, whatever batch it is sampled in.
    """
    model.eval()
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
    rows = [p for p in prompts for _ in range(params.n)]
    B = len(rows)
    if seeds is not None and len(seeds) != B:
        raise ValueError(f"seeds: one per row ({B} = prompts x n), got {len(seeds)}")
    if B == 0:
        return Generation([], [], [] if return_entropy else None)
    uniforms = (
        row_uniforms(seeds, params.max_new_tokens)
        if seeds is not None and params.temperature > 0
        else None
    )
    width = max(len(p) for p in rows)
    input_ids = torch.full((B, width), params.pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, p in enumerate(rows):  # left-pad so every row's next token is in the last column
        input_ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1

    logits, past = model(input_ids, mask)
    tokens = torch.empty((B, params.max_new_tokens), dtype=torch.long)
    token_logprobs = torch.zeros((B, params.max_new_tokens))
    token_entropy = torch.zeros((B, params.max_new_tokens))
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.full((B,), params.max_new_tokens, dtype=torch.long)
    for t in range(params.max_new_tokens):
        step_logits = logits[:, -1, :].float()  # (B, V)
        if params.temperature > 0:
            scaled = step_logits / params.temperature
            logp = F.log_softmax(scaled, dim=-1)  # the tempered policy
            sample_logp = F.log_softmax(top_k_top_p_filter(scaled, params.top_k, params.top_p), -1)
            if uniforms is not None:
                nxt = _sample_inverse_cdf(sample_logp.exp(), uniforms[:, t])  # (B,)
            else:
                nxt = torch.multinomial(sample_logp.exp(), 1, generator=generator).squeeze(1)
            if params.truncated_logprobs:
                logp = sample_logp
        else:
            logp = F.log_softmax(step_logits, dim=-1)
            nxt = step_logits.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, params.pad_id), nxt)
        tokens[:, t] = nxt
        token_logprobs[:, t] = logp.gather(1, nxt[:, None]).squeeze(1)
        if return_entropy:
            token_entropy[:, t] = entropy_from_logp(logp)
        finished_now = ~done & (nxt == params.eos_id)
        lengths[finished_now] = t + 1
        done |= finished_now
        if bool(done.all()) or t == params.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
        logits, past = model(nxt[:, None], mask, past)

    responses = [tokens[i, : lengths[i]].tolist() for i in range(B)]
    logprobs = [token_logprobs[i, : lengths[i]].tolist() for i in range(B)]
    entropies = (
        [token_entropy[i, : lengths[i]].tolist() for i in range(B)] if return_entropy else None
    )
    return Generation(responses, logprobs, entropies)


def pack_responses(
    prompt_ids: torch.Tensor,  # (B, P) left-aligned, right-padded
    prompt_mask: torch.Tensor,  # (B, P) bool
    response_ids: torch.Tensor,  # (B, R) right-padded
    response_mask: torch.Tensor,  # (B, R) bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows prompt+response with padding only at the end: (seq, attn, predict_at).

    seq, attn: (B, W). predict_at: (B, R), the column whose output predicts each
    response token (P_i + k - 1), i.e. the state before the token was sampled:
    where log-probs and critic values are read.
    """
    B = prompt_ids.shape[0]
    p_len = prompt_mask.sum(dim=1)  # (B,)
    r_len = response_mask.sum(dim=1)
    if bool((p_len == 0).any()):
        rows = (p_len == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have an empty prompt: nothing predicts their first token")
    total = p_len + r_len
    width = int(total.max())
    seq = torch.zeros((B, width), dtype=torch.long)
    cols = torch.arange(width)[None, :]  # (1, W)
    in_prompt = cols < p_len[:, None]
    in_resp = (cols >= p_len[:, None]) & (cols < total[:, None])
    seq[in_prompt] = prompt_ids[prompt_mask].long()
    seq[in_resp] = response_ids[response_mask].long()
    attn = (cols < total[:, None]).long()
    R = response_ids.shape[1]
    predict_at = (p_len[:, None] - 1 + torch.arange(R)[None, :]).clamp(max=width - 1)  # (B, R)
    return seq, attn, predict_at


def gather_columns(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x (B, W, ...) read at columns `at` (B, R) -> (B, R, ...)."""
    index = at.reshape(*at.shape, *([1] * (x.dim() - 2))).expand(*at.shape, *x.shape[2:])
    return x.gather(1, index)


def response_logprobs(
    model: CausalLMLike,
    prompt_ids: torch.Tensor,  # (B, P) left-aligned, right-padded
    prompt_mask: torch.Tensor,  # (B, P) bool
    response_ids: torch.Tensor,  # (B, R) right-padded
    response_mask: torch.Tensor,  # (B, R) bool
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, R) of each response token given its prompt; 0 at padding.

    Rows are packed as prompt+response with padding only at the end, so
    positions match what generation used. Gradients flow when called in grad mode.
    With `return_entropy=True` also returns the entropy (B, R) of the tempered
    next-token distribution at each response position (0 at padding).
    """
    seq, attn, predict_at = pack_responses(prompt_ids, prompt_mask, response_ids, response_mask)
    logits, _ = model(seq, attn)  # (B, W, V)
    step_logits = gather_columns(logits, predict_at)  # (B, R, V)
    logp = F.log_softmax(step_logits.float() / temperature, dim=-1)
    token_logp = logp.gather(2, response_ids.long().clamp(min=0)[:, :, None]).squeeze(2)
    token_logp = token_logp * response_mask
    if not return_entropy:
        return token_logp
    entropy = -(logp.exp() * logp).sum(dim=-1)  # (B, R); log_softmax is finite here
    return token_logp, entropy * response_mask
