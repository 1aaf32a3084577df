"""asyncflow.operators.losses: KL estimators, aggregation, PPO (clip-higher, dual-clip,
decoupled IS), entropy and the clipped value loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from asyncflow.operators.losses import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    aggregate_terms,
    behaviour_is_weights,
    decoupled_ppo_loss,
    decoupled_ppo_token_loss,
    entropy_from_logits,
    entropy_loss,
    kl_estimate,
    masked_mean,
    ppo_clip_loss,
    ppo_clip_token_loss,
    value_clip_loss,
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


# --- dual-clip and clip-higher ----------------------------------------------------------------
# One row of 4 tokens, clip_eps = 0.2 (range [0.8, 1.2]), dual-clip c = 3:
#   t  A   r    r A   clip(r) A   min(.)   dual: max(min, c A)   loss
#   0  -1  5.0  -5.0  -1.2        -5.0     max(-5, -3) = -3       3.0   dual-clipped
#   1  -1  2.0  -2.0  -1.2        -2.0     max(-2, -3) = -2       2.0
#   2  +2  5.0  10.0   2.4         2.4     (A > 0: no dual)      -2.4   clipped
#   3  -1  0.5  -0.5  -0.8        -0.8     max(-0.8, -3) = -0.8   0.8   clipped
# token-mean loss = (3 + 2 - 2.4 + 0.8) / 4 = 0.85; without dual-clip token 0 costs 5:
#   (5 + 2 - 2.4 + 0.8) / 4 = 1.35
DC_RATIOS = torch.tensor([[5.0, 2.0, 5.0, 0.5]])
DC_ADV = torch.tensor([[-1.0, -1.0, 2.0, -1.0]])
DC_OLD = torch.tensor([[-1.0, -0.5, -2.0, -0.3]])
DC_MASK = torch.ones(1, 4, dtype=torch.bool)


def dc_logprob() -> torch.Tensor:
    return (DC_OLD + torch.log(DC_RATIOS)).clone().requires_grad_(True)


def test_dual_clip_hand_computed():
    lp = dc_logprob()
    loss, metrics = ppo_clip_loss(lp, DC_OLD, DC_ADV, DC_MASK, 0.2, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(0.85, abs=1e-6)
    assert metrics["actor/dual_clip_frac"].item() == pytest.approx(0.25)
    assert metrics["actor/clip_frac"].item() == pytest.approx(0.5)  # tokens 2 and 3
    loss.backward()
    # d loss / d logp = -r A / N on unclipped tokens (only token 1: -2 * -1 / 4 = 0.5);
    # dual-clipped (constant c |A|) and clipped tokens get no gradient.
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.5, 0.0, 0.0]]), atol=1e-6, rtol=0)
    plain, plain_metrics = ppo_clip_loss(dc_logprob(), DC_OLD, DC_ADV, DC_MASK, 0.2)
    assert plain.item() == pytest.approx(1.35, abs=1e-6)
    assert "actor/dual_clip_frac" not in plain_metrics


def test_dual_clip_bounds_the_loss_by_c_times_abs_advantage():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(16, 8, generator=gen) * 3
    old = torch.randn(16, 8, generator=gen) * 3
    adv = torch.randn(16, 8, generator=gen)
    loss, _ = ppo_clip_token_loss(logp, old, adv, 0.2, clip_ratio_c=3.0)
    assert (loss <= 3.0 * adv.abs() + 1e-6).all()
    unbounded, _ = ppo_clip_token_loss(logp, old, adv, 0.2)
    assert (unbounded > 3.0 * adv.abs() + 1e-3).any()  # the bound does bind on this data
    torch.testing.assert_close(loss[adv > 0], unbounded[adv > 0])  # only A < 0 is touched


def test_dual_clip_needs_c_above_one():
    with pytest.raises(ValueError, match="clip_ratio_c > 1"):
        ppo_clip_token_loss(OLD, OLD, OLD, 0.2, clip_ratio_c=1.0)


def test_clip_higher_widens_only_the_upper_bound():
    # A = +1, r = 1.25: clip_eps = 0.2 caps the objective at 1.2 (no gradient);
    # clip_eps_high = 0.28 lets 1.25 through (gradient -r A = -1.25).
    # A = -1, r = 0.75: the lower bound 0.8 is unchanged by clip_eps_high: objective -0.8.
    old = torch.tensor([[-1.0, -1.0]])
    lp = (old + torch.log(torch.tensor([[1.25, 0.75]]))).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = ppo_clip_token_loss(lp, old, adv, 0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.2, 0.8]]))
    loss_high, _ = ppo_clip_token_loss(lp, old, adv, 0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss_high.detach(), torch.tensor([[-1.25, 0.8]]))
    loss_high.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.25, 0.0]]))


# --- decoupled PPO: importance weights for stale samples --------------------------------------
# prox / behav = [0.5, 1.5, 3.0, 10.0], cap 2:
#   truncate: min(w, 2) = [0.5, 1.5, 2.0, 2.0];  mask (AReaL): [0.5, 1.5, 0, 0]; capped 2 / 4
IS_BEHAV = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
IS_PROX = IS_BEHAV + torch.log(torch.tensor([[0.5, 1.5, 3.0, 10.0]]))


def test_is_weights_truncate_and_mask():
    w, stats = behaviour_is_weights(IS_PROX, IS_BEHAV, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5, 2.0, 2.0]]))
    assert stats["actor/is_capped_frac"].tolist() == [[0.0, 0.0, 1.0, 1.0]]
    w, _ = behaviour_is_weights(IS_PROX, IS_BEHAV, cap=2.0, mode="mask")
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown IS mode 'clip'"):
        behaviour_is_weights(IS_PROX, IS_BEHAV, mode="clip")


def test_is_weights_carry_no_gradient():
    prox = IS_PROX.clone().requires_grad_(True)
    w, _ = behaviour_is_weights(prox, IS_BEHAV)
    assert not w.requires_grad


def test_decoupled_loss_hand_computed():
    # pi = pi_prox (ratio 1, inside the clip range) and A = +1: per-token loss -w,
    # token-mean = -(0.5 + 1.5 + 2 + 2) / 4 = -1.5; gradient -w r A / N = -w / 4.
    lp = IS_PROX.clone().requires_grad_(True)
    adv = torch.ones(1, 4)
    loss, metrics = decoupled_ppo_loss(lp, IS_PROX, IS_BEHAV, adv, DC_MASK, is_cap=2.0)
    assert loss.item() == pytest.approx(-1.5, abs=1e-6)
    assert metrics["actor/is_weight"].item() == pytest.approx(1.5, abs=1e-6)
    assert metrics["actor/is_capped_frac"].item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(lp.grad, -torch.tensor([[0.5, 1.5, 2.0, 2.0]]) / 4)


def test_decoupled_ratio_is_taken_against_the_proximal_policy():
    # pi / pi_prox = 1.5 with A = +1 is clipped to 1.2 whatever pi_behav is; the weight
    # pi_prox / pi_behav = 1.5 (below the cap) then scales it: loss = -1.2 * 1.5 = -1.8
    behav = torch.tensor([[-2.0]])
    prox = behav + math.log(1.5)
    lp = prox + math.log(1.5)
    loss, stats = decoupled_ppo_token_loss(lp, prox, behav, torch.ones(1, 1), 0.2, is_cap=5.0)
    assert loss.item() == pytest.approx(-1.8, abs=1e-6)
    assert stats["actor/clip_frac"].item() == 1.0


def test_decoupled_equals_ppo_when_fresh():
    # pi_prox = pi_behav: every weight is 1 and the loss is plain PPO against it.
    lp = logprob()
    ppo, _ = ppo_clip_token_loss(lp, OLD, ADV_ROW, 0.2, clip_ratio_c=3.0)
    dec, _ = decoupled_ppo_token_loss(lp, OLD, OLD, ADV_ROW, 0.2, clip_ratio_c=3.0)
    torch.testing.assert_close(dec, ppo)


def test_policy_loss_registry_records_inputs_and_options():
    import inspect

    for name, spec in POLICY_LOSSES.items():
        params = inspect.signature(spec.fn).parameters
        for arg in ("logprob", "advantages", *spec.inputs, *spec.options):
            assert arg in params, (name, arg)
    assert POLICY_LOSSES["decoupled_ppo"].inputs == ("prox_logprob", "behav_logprob")
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


# --- entropy ----------------------------------------------------------------------------------


def test_entropy_hand_computed():
    # p = [0.5, 0.25, 0.25]: H = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.5 ln 2
    # uniform over 8: ln 8; a near one-hot distribution: ~0
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert entropy_from_logits(torch.zeros(8)).item() == pytest.approx(math.log(8), abs=1e-6)
    assert entropy_from_logits(torch.tensor([50.0, 0.0, 0.0])).item() == pytest.approx(0, abs=1e-6)
    # shifting logits changes nothing
    assert entropy_from_logits(logits + 7.0).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


def test_entropy_loss_is_minus_aggregated_entropy():
    # entropies [[1, 2, 3], [4, pad, pad]]: token-mean 10 / 4 = 2.5, loss -2.5
    loss, metrics = entropy_loss(AGG_X, AGG_MASK)
    assert loss.item() == pytest.approx(-2.5)
    assert metrics["actor/entropy"].item() == pytest.approx(2.5)
    seq, _ = entropy_loss(AGG_X, AGG_MASK, "seq-mean-token-mean")
    assert seq.item() == pytest.approx(-(2 + 4) / 2)


# --- clipped value loss -----------------------------------------------------------------------
# clip_eps = 0.2; per token (V, V_old, R):
#   (1.0, 0.5, 2.0): (V-R)^2 = 1;    V_clip = 0.5 + 0.2 = 0.7, (0.7-2)^2 = 1.69 -> 1.69 / 2 = 0.845
#                    clipped term is larger (counts in clip_frac) and constant in V: grad 0
#   (1.0, 0.9, 0.0): (V-R)^2 = 1;    V_clip = V = 1.0 (inside), 1          -> 0.5, grad (V-R) = 1
#   (0.0, 0.5, 1.0): (V-R)^2 = 1;    V_clip = 0.3, (0.3-1)^2 = 0.49      -> 0.5, grad -1
#   (3.0, 2.0, 2.5): (V-R)^2 = 0.25; V_clip = 2.2, (2.2-2.5)^2 = 0.09    -> 0.125, grad 0.5
#   (pad)            ignored
# token-mean = (0.845 + 0.5 + 0.5 + 0.125) / 4 = 0.4925; clip_frac = 1 / 4
V_NEW = torch.tensor([[1.0, 1.0, 0.0], [3.0, 8.0, 8.0]])
V_OLD = torch.tensor([[0.5, 0.9, 0.5], [2.0, 0.0, 0.0]])
V_RET = torch.tensor([[2.0, 0.0, 1.0], [2.5, 0.0, 0.0]])
V_MASK = torch.tensor([[True, True, True], [True, False, False]])


def test_value_clip_loss_hand_computed():
    v = V_NEW.clone().requires_grad_(True)
    loss, metrics = value_clip_loss(v, V_OLD, V_RET, V_MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.4925, abs=1e-6)
    assert metrics["critic/vf_clip_frac"].item() == pytest.approx(0.25)
    assert metrics["critic/vpred_mean"].item() == pytest.approx((1 + 1 + 0 + 3) / 4)
    loss.backward()
    expected = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 0.0]]) / 4
    torch.testing.assert_close(v.grad, expected, atol=1e-6, rtol=0)


def test_value_loss_without_clipping():
    # (V - R)^2 / 2 over real tokens: [1, 1, 1, 0.25] / 2 -> mean 3.25 / 8 = 0.40625
    loss, metrics = value_clip_loss(V_NEW, V_OLD, V_RET, V_MASK, clip_eps=None)
    assert loss.item() == pytest.approx(0.40625)
    assert metrics["critic/vf_clip_frac"].item() == 0.0


# --- gradient checks (float64, finite differences) --------------------------------------------


def f64(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)


def test_gradcheck_ppo_dual_clip_and_decoupled():
    old, adv = f64(3, 4, seed=1).detach(), f64(3, 4, seed=2).detach()
    behav = f64(3, 4, seed=3).detach()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    lp = (old + f64(3, 4, seed=4, scale=0.5)).detach().requires_grad_(True)

    def ppo(x):
        return ppo_clip_loss(x, old, adv, mask, 0.2, clip_ratio_c=3.0)[0]

    def decoupled(x):
        return decoupled_ppo_loss(x, old, behav, adv, mask, 0.2, "seq-mean-token-mean")[0]

    assert torch.autograd.gradcheck(ppo, (lp,))
    assert torch.autograd.gradcheck(decoupled, (lp,))


def test_gradcheck_value_loss_entropy_and_kl():
    old, ret = f64(2, 5, seed=5).detach(), f64(2, 5, seed=6).detach()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    v = (old + f64(2, 5, seed=7, scale=0.5)).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: value_clip_loss(x, old, ret, mask)[0], (v,))
    assert torch.autograd.gradcheck(entropy_from_logits, (f64(2, 3, 6, seed=8),))
    ref = f64(2, 5, seed=9).detach()
    for kind in KL_ESTIMATORS:
        lp = f64(2, 5, seed=10)
        assert torch.autograd.gradcheck(lambda x, k=kind: kl_estimate(x, ref, k), (lp,))
