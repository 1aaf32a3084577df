"""Policy-gradient losses and KL estimators over masked (B, T) token tensors.

Each loss returns (loss, metrics) with namespaced metric keys, following verl's
core_algos layout; metrics are detached tensors so no loss forces a device sync.
Aggregation is split into a numerator and a denominator so that a trainer fed
micro-batch by micro-batch can sum both and divide once: the update is then the
same however the global batch was cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def check_agg_mode(mode: str) -> None:
    """Raise ValueError naming the valid modes, for configuration-time checks."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; one of {LOSS_AGG_MODES}")


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


# --- KL estimators --------------------------------------------------------------------------
# Per-token KL(pi || pi_ref) from samples of pi (Schulman 2020), as functions of
# log r = log pi - log pi_ref. k1 is unbiased but takes both signs; k2 is biased,
# non-negative; k3 is unbiased and non-negative.
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda log_ratio: log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    "k3": lambda log_ratio: torch.exp(-log_ratio) - 1 + log_ratio,
}


def kl_estimate(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators from samples of pi (Schulman 2020).

    k1 = log r', k2 = (log r')^2 / 2, k3 = (r - 1) - log r, with log r = ref - logprob
    and log r' = logprob - ref. k3 is unbiased and non-negative.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {kind!r}; choose {', '.join(list(KL_ESTIMATORS)[:-1])} "
            f"or {list(KL_ESTIMATORS)[-1]}"
        )
    return KL_ESTIMATORS[kind](logprob - ref_logprob)


# --- policy losses ----------------------------------------------------------------------------


def ppo_clip_token_loss(
    logprob: torch.Tensor,  # (B, T) current policy
    old_logprob: torch.Tensor,  # (B, T) policy that sampled the tokens
    advantages: torch.Tensor,  # (B, T) or (B,) broadcast over tokens
    clip_eps: float = 0.2,
    *,
    clip_eps_high: float | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate -min(r A, clip(r, 1-eps, 1+eps_high) A), with stats.

    clip_eps_high (DAPO's clip-higher) defaults to clip_eps. clip_ratio_c enables
    dual-clip PPO (Ye et al. 2020): for A < 0 the objective is also bounded below by
    c * A, so one token with a huge ratio cannot dominate: loss <= -c * A = c |A|.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprob)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprob - old_logprob)  # (B, T)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages
    objective = torch.minimum(unclipped, clipped)  # PPO's pessimistic bound
    stats = {}
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"dual-clip needs clip_ratio_c > 1, got {clip_ratio_c}")
        lower = clip_ratio_c * advantages  # only binds where A < 0
        dual = (advantages < 0) & (lower > objective)
        objective = torch.where(advantages < 0, torch.maximum(objective, lower), objective)
        stats["actor/dual_clip_frac"] = dual.float()
    loss = -objective
    with torch.no_grad():
        stats |= {
            "actor/clip_frac": (clipped < unclipped).float(),
            "actor/approx_kl": 0.5 * (logprob - old_logprob) ** 2,
            "actor/ratio_mean": ratio.detach(),
        }
    return loss, stats


IS_MODES = ("truncate", "mask")


def behaviour_is_weights(
    prox_logprob: torch.Tensor,  # (B, T) proximal policy (recomputed with the current weights)
    behav_logprob: torch.Tensor,  # (B, T) behaviour policy that sampled (rollout log-probs)
    cap: float = 2.0,
    mode: str = "truncate",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights w = pi_prox / pi_behav for stale samples, bounded by `cap`.

    truncate: w = min(exp(prox - behav), cap) (truncated IS);
    mask: w = exp(prox - behav) where it is <= cap, else 0 (AReaL drops those tokens).
    The weights are data: no gradient flows through them.
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown IS mode {mode!r}; choose one of {IS_MODES}")
    with torch.no_grad():
        raw = torch.exp(prox_logprob - behav_logprob)  # (B, T)
        over = raw > cap
        if mode == "truncate":
            weights = torch.clamp(raw, max=cap)
        else:
            weights = torch.where(over, torch.zeros_like(raw), raw)
        stats = {"actor/is_weight": weights, "actor/is_capped_frac": over.float()}
    return weights, stats


def decoupled_ppo_token_loss(
    logprob: torch.Tensor,  # (B, T) current policy
    prox_logprob: torch.Tensor,  # (B, T) proximal policy: the trust region's centre
    behav_logprob: torch.Tensor,  # (B, T) behaviour policy that generated the tokens
    advantages: torch.Tensor,  # (B, T) or (B,)
    clip_eps: float = 0.2,
    *,
    clip_eps_high: float | None = None,
    clip_ratio_c: float | None = None,
    is_cap: float = 2.0,
    is_mode: str = "truncate",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO (AReaL, Fu et al. 2025): clip the ratio pi / pi_prox, and correct for
    stale samples with the bounded weight pi_prox / pi_behav multiplying the loss."""
    loss, stats = ppo_clip_token_loss(
        logprob,
        prox_logprob,
        advantages,
        clip_eps,
        clip_eps_high=clip_eps_high,
        clip_ratio_c=clip_ratio_c,
    )
    weights, is_stats = behaviour_is_weights(prox_logprob, behav_logprob, is_cap, is_mode)
    return loss * weights, stats | is_stats


@dataclass(frozen=True)
class PolicyLoss:
    """A per-token policy loss and what it reads, so trainers look inputs up, never branch."""

    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    inputs: tuple[str, ...]  # (B, T) tensors passed by keyword besides logprob and advantages
    options: tuple[str, ...]  # hyperparameters it accepts by keyword


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo": PolicyLoss(
        ppo_clip_token_loss, ("old_logprob",), ("clip_eps", "clip_eps_high", "clip_ratio_c")
    ),
    "decoupled_ppo": PolicyLoss(
        decoupled_ppo_token_loss,
        ("prox_logprob", "behav_logprob"),
        ("clip_eps", "clip_eps_high", "clip_ratio_c", "is_cap", "is_mode"),
    ),
}


def ppo_clip_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,  # (B, T) bool, real response tokens
    clip_eps: float = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
    *,
    clip_eps_high: float | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate aggregated over the batch; metrics are token-means."""
    token_loss, stats = ppo_clip_token_loss(
        logprob,
        old_logprob,
        advantages,
        clip_eps,
        clip_eps_high=clip_eps_high,
        clip_ratio_c=clip_ratio_c,
    )
    loss = aggregate(token_loss, mask, loss_agg_mode, norm_len)
    return loss, {key: masked_mean(value, mask) for key, value in stats.items()}


def decoupled_ppo_loss(
    logprob: torch.Tensor,
    prox_logprob: torch.Tensor,
    behav_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO aggregated over the batch; metrics are token-means."""
    token_loss, stats = decoupled_ppo_token_loss(
        logprob, prox_logprob, behav_logprob, advantages, clip_eps, **options
    )
    loss = aggregate(token_loss, mask, loss_agg_mode, norm_len)
    return loss, {key: masked_mean(value, mask) for key, value in stats.items()}


# --- entropy and value losses -----------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) over the last dim: logsumexp(z) - sum_v softmax(z)_v z_v."""
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


def entropy_loss(
    entropy: torch.Tensor,  # (B, T) per-token entropy of the current policy
    mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The entropy bonus as a loss to add with a positive coefficient: -aggregate(H)."""
    loss = -aggregate(entropy, mask, loss_agg_mode, norm_len)
    return loss, {"actor/entropy": masked_mean(entropy.detach(), mask)}


def value_clip_token_loss(
    values: torch.Tensor,  # (B, T) current critic V(s_t)
    old_values: torch.Tensor,  # (B, T) critic values when the rollout was scored
    returns: torch.Tensor,  # (B, T) targets R_t (e.g. GAE advantages + old values)
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO value clipping: max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) / 2.

    `clip_eps=None` gives the plain (V - R)^2 / 2.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss, clipped_more = 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (v_clipped - returns) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        clipped_more = clipped > unclipped
    with torch.no_grad():
        stats = {
            "critic/vf_clip_frac": clipped_more.float(),
            "critic/vpred_mean": values.detach(),
        }
    return loss, stats


def value_clip_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss aggregated over the batch; metrics are token-means."""
    token_loss, stats = value_clip_token_loss(values, old_values, returns, clip_eps)
    loss = aggregate(token_loss, mask, loss_agg_mode, norm_len)
    return loss, {key: masked_mean(value, mask) for key, value in stats.items()}
