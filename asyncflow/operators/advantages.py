"""Advantage estimators: GRPO, Dr.GRPO, RLOO, REINFORCE++, GAE.

Pure functions of tensors so they can be checked against hand-computed values;
the operators that call them only move columns in and out. Outcome estimators
take one reward per response; token-level ones take (B, T) rewards and a (B, T)
mask of real (right-padded, ragged) response tokens. `ADVANTAGE_ESTIMATORS` maps
a name to the function and the inputs it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncflow.operators.losses import kl_estimate, masked_mean


def grpo_advantages(
    rewards: torch.Tensor,  # (B,) one scalar reward per response
    group_ids: torch.Tensor,  # (B,) int64, responses to the same prompt share an id
    *,
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_g) / (std_g + eps) within each group g.

    std is the unbiased sample std (as torch.std and verl use); a group of one
    response, or one whose rewards are all equal, gets advantage 0. With
    `normalize_std=False` this is Dr.GRPO's mean-only baseline.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
            "must be equal 1-D shapes"
        )
    # float64 so a group of identical rewards centres to exactly 0 (float32 means of
    # values like 0.7 leave ~1e-8 residues that eps would blow up to ~0.05)
    r = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    G = counts.shape[0]
    means = torch.zeros(G, dtype=torch.float64).index_add_(0, inverse, r) / counts
    lo = torch.full((G,), torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, r, "amin")
    hi = torch.full((G,), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, r, "amax")
    uniform = (lo == hi)[inverse]  # no signal in this group: advantage exactly 0
    centered = torch.where(uniform, 0.0, r - means[inverse])
    if normalize_std:
        sq = torch.zeros(G, dtype=torch.float64).index_add_(0, inverse, centered**2)
        stds = torch.sqrt(sq / (counts - 1).clamp(min=1))
        centered = centered / (stds[inverse] + eps)
    return centered.to(torch.float32)


def rloo_advantages(
    rewards: torch.Tensor,  # (B,)
    group_ids: torch.Tensor,  # (B,) int64
) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - mean_{j != i in g} r_j.

    Equivalently G / (G - 1) * (r_i - mean_g). A group of one has no other sample
    to form a baseline from: its advantage is 0.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
            "must be equal 1-D shapes"
        )
    r = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, inverse, r)
    others = (counts[inverse] - 1).to(torch.float64)  # (B,) size of the leave-one-out set
    baseline = (sums[inverse] - r) / others.clamp(min=1)
    return torch.where(others > 0, r - baseline, 0.0).to(torch.float32)


# --- token-level pieces -----------------------------------------------------------------------


def outcome_token_rewards(
    rewards: torch.Tensor,  # (B,) one outcome reward per response
    mask: torch.Tensor,  # (B, T) bool, real response tokens
) -> torch.Tensor:
    """(B, T) token rewards: each outcome reward at its response's last real token, 0 elsewhere.

    An empty response has no token to carry its reward.
    """
    cols = torch.arange(mask.shape[1])[None, :]  # (1, T)
    last_col = (cols * mask).amax(dim=1, keepdim=True) if mask.shape[1] else cols  # (B, 1)
    last = (cols == last_col) & mask.bool()  # (B, T)
    return torch.where(last, rewards.to(torch.float32)[:, None], 0.0)


def kl_penalized_rewards(
    token_rewards: torch.Tensor,  # (B, T)
    logprob: torch.Tensor,  # (B, T) policy that sampled (or the current actor's recompute)
    ref_logprob: torch.Tensor,  # (B, T) frozen reference
    mask: torch.Tensor,  # (B, T)
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL in the reward (InstructGPT; verl `use_kl_in_reward`): r_t - kl_coef * KL_t per token."""
    kl = kl_estimate(logprob, ref_logprob, kind) * mask  # (B, T)
    rewards = token_rewards - kl_coef * kl
    return rewards, {"reward/kl": masked_mean(kl, mask), "reward/kl_coef": torch.tensor(kl_coef)}


def masked_whiten(
    x: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the real tokens of the whole batch; 0 at padding.

    var is the unbiased (N - 1) variance, as verl's masked_whiten; in float64.
    """
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    n = m.sum()
    mean = (x64 * m).sum() / n.clamp(min=1)
    var = (((x64 - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return ((x64 - mean) * torch.rsqrt(var + eps) * m).to(torch.float32)


def gae_advantages(
    token_rewards: torch.Tensor,  # (B, T) r_t, e.g. the outcome at the last real token
    values: torch.Tensor,  # (B, T) V(s_t) from the critic, per response token
    mask: torch.Tensor,  # (B, T) bool, real response tokens
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016): (advantages, returns), each (B, T), 0 at padding.

        delta_t = r_t + gamma * V_{t+1} - V_t       (V after the last real token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                         (the critic's regression target)

    Padding is skipped, not treated as states: t+1 means the next real token, so a
    mask with holes (e.g. tool output inside a response) chains across them.
    Vectorised over the batch, one step per token back in time, in float64.
    """
    m = mask.to(torch.float64)
    r = token_rewards.to(torch.float64) * m
    v = values.to(torch.float64) * m
    B, T = r.shape
    next_value = torch.zeros(B, dtype=torch.float64)  # V of the next real token
    next_adv = torch.zeros(B, dtype=torch.float64)  # A of the next real token
    adv = torch.zeros(B, T, dtype=torch.float64)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = a_t * m[:, t]
        # carry the next real token's value/advantage across padding
        next_value = torch.where(m[:, t] > 0, v[:, t], next_value)
        next_adv = torch.where(m[:, t] > 0, a_t, next_adv)
    returns = (adv + v) * m
    return adv.to(torch.float32), returns.to(torch.float32)


def discounted_returns(
    token_rewards: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    gamma: float = 1.0,
) -> torch.Tensor:
    """G_t = sum_{l >= 0} gamma^l r_{t+l} over real tokens: GAE with V = 0 and lambda = 1."""
    returns, _ = gae_advantages(
        token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0
    )
    return returns


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,  # (B, T) outcome at the last token, minus a KL penalty if any
    mask: torch.Tensor,  # (B, T)
    *,
    gamma: float = 1.0,
    whiten_eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): token-level discounted returns, whitened over every real
    token of the batch (no critic, no group baseline). Returns (advantages, returns)."""
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask, whiten_eps), returns


# --- the registry -----------------------------------------------------------------------------


def _per_sequence(adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    token = adv[:, None] * mask.to(torch.float32)  # (B, T): one value over each response
    return token, token


def grpo_token_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`grpo_advantages` broadcast over each response's tokens; returns = advantages."""
    adv = grpo_advantages(rewards, group_ids, eps=eps, normalize_std=normalize_std)
    return _per_sequence(adv, mask)


def drgrpo_token_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr.GRPO (Liu et al. 2025): r_i - mean_g, no std division."""
    return grpo_token_advantages(rewards, group_ids, mask, normalize_std=False)


def rloo_token_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rloo_advantages` broadcast over each response's tokens; returns = advantages."""
    return _per_sequence(rloo_advantages(rewards, group_ids), mask)


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    whiten_eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the batch's tokens."""
    centered = grpo_advantages(rewards, group_ids, normalize_std=False)
    returns = centered[:, None] * mask.to(torch.float32)
    return masked_whiten(returns, mask, whiten_eps), returns


@dataclass(frozen=True)
class AdvantageEstimator:
    """An estimator and the inputs it reads, so callers look inputs up instead of branching.

    `fn(**inputs, **options) -> (advantages, returns)`, each (B, T) and 0 at padding;
    every input name is a key of `ESTIMATOR_INPUTS`.
    """

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    inputs: tuple[str, ...]
    options: tuple[str, ...] = ()  # hyperparameters fn takes by keyword
    per_token: bool = False  # advantages vary along a response (else one value per response)
    uses_lengths: bool = False  # response lengths change the values (token-level whitening)


ESTIMATOR_INPUTS = {
    "rewards": "(B,) one outcome reward per response",
    "group_ids": "(B,) int64, responses to the same prompt share an id",
    "token_rewards": "(B, T) per-token rewards (outcome at the last real token, minus any KL)",
    "values": "(B, T) critic values V(s_t) per response token",
    "mask": "(B, T) bool, real response tokens",
}

_OUTCOME = ("rewards", "group_ids", "mask")
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(
        gae_advantages,
        ("token_rewards", "values", "mask"),
        ("gamma", "lam"),
        per_token=True,
        uses_lengths=True,
    ),
    "grpo": AdvantageEstimator(grpo_token_advantages, _OUTCOME, ("eps",)),
    "drgrpo": AdvantageEstimator(drgrpo_token_advantages, _OUTCOME),
    "rloo": AdvantageEstimator(rloo_token_advantages, _OUTCOME),
    # one value per response with the default gamma = 1 on outcome rewards without KL
    "reinforce_pp": AdvantageEstimator(
        reinforce_pp_advantages,
        ("token_rewards", "mask"),
        ("gamma", "whiten_eps"),
        uses_lengths=True,
    ),
    "reinforce_pp_baseline": AdvantageEstimator(
        reinforce_pp_baseline_advantages, _OUTCOME, ("whiten_eps",), uses_lengths=True
    ),
}
