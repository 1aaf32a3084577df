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
