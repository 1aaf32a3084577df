"""Policy-gradient losses and KL estimators over masked (B, T) token tensors.

Each loss returns (loss, metrics) with namespaced metric keys, following verl's
core_algos layout; metrics are detached tensors so no loss forces a device sync.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean over real tokens: sum(x * m) / sum(m)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


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


def ppo_clip_loss(
    logprob: torch.Tensor,  # (B, T) current policy
    old_logprob: torch.Tensor,  # (B, T) policy that sampled the tokens
    advantages: torch.Tensor,  # (B, T) or (B,) broadcast over tokens
    mask: torch.Tensor,  # (B, T) bool, real response tokens
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: -mean(min(r A, clip(r, 1-eps, 1+eps) A)), token-mean."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprob)
    ratio = torch.exp(logprob - old_logprob)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "actor/clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "actor/approx_kl": masked_mean(0.5 * (logprob - old_logprob) ** 2, mask),
            "actor/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics
