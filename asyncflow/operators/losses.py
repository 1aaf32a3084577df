"""Policy-gradient losses and KL estimators over masked (B, T) token tensors.

Each loss returns (loss, metrics) with namespaced metric keys, following verl's
core_algos layout; metrics are detached tensors so no loss forces a device sync.
Aggregation is split into a numerator and a denominator so that a trainer fed
micro-batch by micro-batch can sum both and divide once: the update is then the
same however the global batch was cut.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean over real tokens: sum(x * m) / sum(m)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate_terms(
    x: torch.Tensor,  # (B, T) per-token loss
    mask: torch.Tensor,  # (B, T) real tokens
    mode: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(numerator, denominator) of `aggregate`: both add up across micro-batches.

    token-mean: sum_{i,t} x / #tokens; seq-mean-token-sum: sum_i (sum_t x) / B;
    seq-mean-token-mean: sum_i mean_t x / B (GRPO paper);
    seq-mean-token-sum-norm: sum_{i,t} x / (B * norm_len) (Dr.GRPO, constant norm_len).
    """
    m = mask.to(x.dtype)
    seq_sums = (x * m).sum(dim=1)  # (B,)
    rows = float(x.shape[0])
    if mode == "token-mean":
        return seq_sums.sum(), float(m.sum())
    if mode == "seq-mean-token-sum":
        return seq_sums.sum(), rows
    if mode == "seq-mean-token-mean":
        return (seq_sums / m.sum(dim=1).clamp(min=1.0)).sum(), rows
    if mode == "seq-mean-token-sum-norm":
        if not norm_len:
            raise ValueError("seq-mean-token-sum-norm needs norm_len (e.g. max response length)")
        return seq_sums.sum(), rows * norm_len
    raise ValueError(
        f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGG_MODES)}"
    )


def aggregate(
    x: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_len: int | None = None
) -> torch.Tensor:
    num, den = aggregate_terms(x, mask, mode, norm_len)
    return num / max(den, 1.0)


def kl_estimate(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators from samples of pi (Schulman 2020).

    k1 = log r', k2 = (log r')^2 / 2, k3 = (r - 1) - log r, with log r = ref - logprob
    and log r' = logprob - ref. k3 is unbiased and non-negative.
    """
    log_ratio = logprob - ref_logprob  # log pi/pi_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        neg = -log_ratio
        return torch.exp(neg) - 1 - neg
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


def ppo_clip_token_loss(
    logprob: torch.Tensor,  # (B, T) current policy
    old_logprob: torch.Tensor,  # (B, T) policy that sampled the tokens
    advantages: torch.Tensor,  # (B, T) or (B,) broadcast over tokens
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate -min(r A, clip(r, 1-eps, 1+eps) A), with per-token stats."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprob)
    ratio = torch.exp(logprob - old_logprob)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "actor/clip_frac": (clipped < unclipped).float(),
            "actor/approx_kl": 0.5 * (logprob - old_logprob) ** 2,
            "actor/ratio_mean": ratio.detach(),
        }
    return loss, stats


def ppo_clip_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,  # (B, T) bool, real response tokens
    clip_eps: float = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate aggregated over the batch; metrics are token-means."""
    token_loss, stats = ppo_clip_token_loss(logprob, old_logprob, advantages, clip_eps)
    loss = aggregate(token_loss, mask, loss_agg_mode, norm_len)
    return loss, {key: masked_mean(value, mask) for key, value in stats.items()}
