"""asyncflow.operators.losses: KL estimators, masked mean and the PPO clipped surrogate."""

from __future__ import annotations

import math

import pytest
import torch

from asyncflow.operators.losses import (
    aggregate,
    aggregate_terms,
    kl_estimate,
    masked_mean,
    ppo_clip_loss,
)

# --- kl_estimate ------------------------------------------------------------------------------

LOGP = torch.tensor([-1.0, -2.0, -0.5, -3.0])
REF = torch.tensor([-1.5, -1.0, -0.5, -0.25])
# log pi/pi_ref = LOGP - REF = [0.5, -1.0, 0.0, -2.75]


def test_kl_k1_is_log_ratio():
    assert kl_estimate(LOGP, REF, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0, -2.75])


def test_kl_k2_is_half_squared_log_ratio():
    # 0.5 * [0.25, 1, 0, 7.5625]
    assert kl_estimate(LOGP, REF, "k2").tolist() == pytest.approx([0.125, 0.5, 0.0, 3.78125])


def test_kl_k3_exact_values_and_default():
    # k3 = exp(ref - logp) - 1 - (ref - logp), with ref - logp = [-0.5, 1.0, 0.0, 2.75]
    expected = [
        math.exp(-0.5) - 1 + 0.5,  # 0.10653...
        math.exp(1.0) - 1 - 1.0,  # 0.71828...
        0.0,
        math.exp(2.75) - 1 - 2.75,  # 11.89259...
    ]
    assert kl_estimate(LOGP, REF, "k3").tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(kl_estimate(LOGP, REF), kl_estimate(LOGP, REF, "k3"))


def test_kl_estimators_vanish_when_policies_agree():
    x = torch.tensor([[-0.3, -4.0], [-1.0, -2.5]])
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(x, x, kind), torch.zeros_like(x))


def test_kl_k3_is_nonnegative():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 32, generator=gen) * 8
    ref = -torch.rand(64, 32, generator=gen) * 8
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    # k2 >= 0 as well; k1 takes both signs on the same data.
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    k1 = kl_estimate(logp, ref, "k1")
    assert (k1 > 0).any() and (k1 < 0).any()


def test_kl_k3_gradient_is_one_minus_ratio():
    # d k3 / d logp = -exp(ref - logp) + 1 = 1 - pi_ref/pi
    logp = LOGP.clone().requires_grad_(True)
    kl_estimate(logp, REF, "k3").sum().backward()
    expected = [1 - math.exp(d) for d in (-0.5, 1.0, 0.0, 2.75)]
    assert logp.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; choose k1, k2 or k3"):
        kl_estimate(LOGP, REF, "k4")


# --- masked_mean ------------------------------------------------------------------------------


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 1e6]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(x, mask.long()).item() == pytest.approx(2.0)
    # Changing a padded value changes nothing.
    x2 = x.clone()
    x2[0, 2] = -123.0
    assert masked_mean(x2, mask).item() == pytest.approx(2.0)


def test_masked_mean_all_masked_is_zero():
    x = torch.tensor([[5.0, 6.0]])
    assert masked_mean(x, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


def test_masked_mean_gradient_only_reaches_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, False]])
    masked_mean(x, mask).backward()
    third = 1 / 3
    torch.testing.assert_close(x.grad, torch.tensor([[third, 0, 0], [third, third, 0]]))


# --- ppo_clip_loss ----------------------------------------------------------------------------
# Hand-built (B=2, T=3) case, clip_eps = 0.2 so the clip range is [0.8, 1.2].
#   row 0, A = +1, ratios [1.1, 1.5, 0.5], all real
#   row 1, A = -2, ratios [1.1, 0.5, 0.3], last token is padding
# min(r A, clip(r) A) per real token:
#   (0,0) r=1.1 inside: min(1.1, 1.1)           =  1.1   not clipped
#   (0,1) r=1.5, A>0:   min(1.5, 1.2)           =  1.2   clipped (ratio too high)
#   (0,2) r=0.5, A>0:   min(0.5, 0.8)           =  0.5   not clipped (pessimistic side)
#   (1,0) r=1.1 inside: min(-2.2, -2.2)         = -2.2   not clipped
#   (1,1) r=0.5, A<0:   min(-1.0, 0.8 * -2)     = -1.6   clipped (ratio too low)
#   (1,2) padding: would be min(-0.6, -1.6) = -1.6 and clipped; must be ignored
# loss = -(1.1 + 1.2 + 0.5 - 2.2 - 1.6) / 5 = -(-1.0) / 5 = 0.2
# clip_frac = 2 / 5 = 0.4; ratio_mean = (1.1 + 1.5 + 0.5 + 1.1 + 0.5) / 5 = 0.94

RATIOS = torch.tensor([[1.1, 1.5, 0.5], [1.1, 0.5, 0.3]])
OLD = torch.tensor([[-1.0, -2.0, -0.7], [-0.4, -1.3, -2.2]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
ADV_ROW = torch.tensor([1.0, -2.0])


def logprob() -> torch.Tensor:
    return (OLD + torch.log(RATIOS)).clone().requires_grad_(True)


def test_ppo_clip_loss_hand_computed():
    loss, metrics = ppo_clip_loss(logprob(), OLD, ADV_ROW[:, None].expand(2, 3), MASK, 0.2)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    assert metrics["actor/clip_frac"].item() == pytest.approx(0.4, abs=1e-6)
    assert metrics["actor/ratio_mean"].item() == pytest.approx(0.94, abs=1e-6)
    log_r = [math.log(r) for r in (1.1, 1.5, 0.5, 1.1, 0.5)]
    approx_kl = sum(0.5 * lr**2 for lr in log_r) / 5
    assert metrics["actor/approx_kl"].item() == pytest.approx(approx_kl, abs=1e-6)
    assert all(not m.requires_grad for m in metrics.values())


def test_ppo_clip_loss_broadcasts_row_advantage():
    full, full_metrics = ppo_clip_loss(logprob(), OLD, ADV_ROW[:, None].expand(2, 3), MASK)
    row, row_metrics = ppo_clip_loss(logprob(), OLD, ADV_ROW, MASK)
    assert row.item() == pytest.approx(full.item(), abs=1e-7)
    assert row.item() == pytest.approx(0.2, abs=1e-6)
    for key in full_metrics:
        assert row_metrics[key].item() == pytest.approx(full_metrics[key].item(), abs=1e-7)


def test_ppo_clip_loss_honours_mask():
    # Unmasking the padded token changes both the loss and clip_frac: the mask is honoured.
    all_real = torch.ones(2, 3, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(logprob(), OLD, ADV_ROW, all_real, 0.2)
    # the padded token (1,2) adds min(-0.6, -1.6) = -1.6 and one more clipped token:
    # loss = -(-1.0 - 1.6) / 6 = 2.6 / 6; clip_frac = 3 / 6
    assert loss.item() == pytest.approx(2.6 / 6, abs=1e-6)
    assert metrics["actor/clip_frac"].item() == pytest.approx(0.5, abs=1e-6)


def test_ppo_clip_loss_other_clip_eps():
    # clip_eps = 0.6, range [0.4, 1.6]: every real ratio (1.1, 1.5, 0.5, 1.1, 0.5) is inside,
    # so nothing is clipped and the loss is the plain surrogate -mean(r A):
    #   loss = -(1.1 + 1.5 + 0.5 - 2.2 - 1.0) / 5 = 0.02
    loss, metrics = ppo_clip_loss(logprob(), OLD, ADV_ROW, MASK, clip_eps=0.6)
    assert loss.item() == pytest.approx(0.02, abs=1e-6)
    assert metrics["actor/clip_frac"].item() == 0.0


def test_ppo_clip_loss_gradient_zero_where_clipped():
    lp = logprob()
    loss, _ = ppo_clip_loss(lp, OLD, ADV_ROW, MASK, 0.2)
    loss.backward()
    # Unclipped real tokens: d(-r A / N) / d logp = -r A / N with N = 5 (d r / d logp = r).
    # Clipped in the direction of the advantage ((0,1) r=1.5 A>0, (1,1) r=0.5 A<0): 0.
    # Padding (1,2): 0.
    expected = torch.tensor(
        [
            [-1.1 * 1 / 5, 0.0, -0.5 * 1 / 5],  # [-0.22, 0, -0.1]
            [-1.1 * -2 / 5, 0.0, 0.0],  # [0.44, 0, 0]
        ]
    )
    torch.testing.assert_close(lp.grad, expected, atol=1e-6, rtol=0)
    assert lp.grad[0, 1].item() == 0.0
    assert lp.grad[1, 1].item() == 0.0
    assert lp.grad[1, 2].item() == 0.0


def test_ppo_clip_loss_at_ratio_one_is_minus_mean_advantage():
    # On-policy (logp == old): ratio 1 everywhere, loss = -mean_tokens(A), nothing clipped,
    # and the gradient is -A / N per real token (the vanilla policy gradient).
    lp = OLD.clone().requires_grad_(True)
    loss, metrics = ppo_clip_loss(lp, OLD, ADV_ROW, MASK)
    assert loss.item() == pytest.approx(-(1 + 1 + 1 - 2 - 2) / 5, abs=1e-6)  # 0.2
    assert metrics["actor/clip_frac"].item() == 0.0
    assert metrics["actor/ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["actor/approx_kl"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.2] * 3, [0.4, 0.4, 0.0]]))


# x = [[1, 2, 3], [4, 0, 0]] with mask [[1, 1, 1], [1, 0, 0]]: row sums 6 and 4, lengths 3 and 1
AGG_X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
AGG_MASK = torch.tensor([[True, True, True], [True, False, False]])


@pytest.mark.parametrize(
    "mode, norm_len, expected",
    [
        ("token-mean", None, (6 + 4) / 4),  # every real token weighs the same
        ("seq-mean-token-sum", None, (6 + 4) / 2),  # mean over rows of row sums
        ("seq-mean-token-mean", None, (6 / 3 + 4 / 1) / 2),  # mean over rows of row means
        ("seq-mean-token-sum-norm", 5, (6 + 4) / (2 * 5)),  # Dr.GRPO: constant length norm
    ],
)
def test_aggregation_modes_exact(mode, norm_len, expected):
    assert aggregate(AGG_X, AGG_MASK, mode, norm_len).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_aggregation_terms_add_up_across_micro_batches(mode):
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    whole = aggregate(x, mask, mode, norm_len=5)
    parts = [aggregate_terms(x[s], mask[s], mode, norm_len=5) for s in (slice(0, 1), slice(1, 6))]
    assert (sum(n for n, _ in parts) / sum(d for _, d in parts)).item() == pytest.approx(
        whole.item(), rel=1e-6
    )


def test_aggregation_rejects_unknown_mode_and_missing_norm_len():
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        aggregate(AGG_X, AGG_MASK, "sum")
    with pytest.raises(ValueError, match="needs norm_len"):
        aggregate(AGG_X, AGG_MASK, "seq-mean-token-sum-norm")
