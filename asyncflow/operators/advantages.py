"""Advantage estimators over outcome rewards.

Pure functions of tensors so they can be checked against hand-computed values;
the operators that call them only move columns in and out.
"""

from __future__ import annotations

import torch


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
    rewards = rewards.to(torch.float32)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    G = counts.shape[0]
    sums = torch.zeros(G).index_add_(0, inverse, rewards)
    means = sums / counts
    centered = rewards - means[inverse]
    if not normalize_std:
        return centered
    sq = torch.zeros(G).index_add_(0, inverse, centered**2)
    dof = (counts - 1).clamp(min=1)
    stds = torch.sqrt(sq / dof)
    adv = centered / (stds[inverse] + eps)
    return torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))
