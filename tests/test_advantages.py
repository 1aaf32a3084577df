"""asyncflow.operators.advantages: every estimator against hand-computed values and loops."""

from __future__ import annotations

import math

import pytest
import torch

from asyncflow.operators.advantages import (
    ADVANTAGE_ESTIMATORS,
    ESTIMATOR_INPUTS,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    kl_penalized_rewards,
    masked_whiten,
    outcome_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)

EPS = 1e-6


def adv(rewards, groups, **kwargs) -> list[float]:
    out = grpo_advantages(
        torch.tensor(rewards, dtype=torch.float32),
        torch.tensor(groups, dtype=torch.int64),
        **kwargs,
    )
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (len(rewards),)
    return out.tolist()


def test_single_group_binary_rewards():
    # rewards [1, 0, 0, 1]: mean 0.5, centered [+0.5, -0.5, -0.5, +0.5],
    # sum of squares 4 * 0.25 = 1, unbiased var 1 / (4 - 1) = 1/3, std sqrt(1/3) = 0.57735...
    # advantage = ±0.5 / (sqrt(1/3) + eps) = ±0.8660...
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert a == pytest.approx(0.8660239, abs=1e-6)
    assert adv([1, 0, 0, 1], [0, 0, 0, 0]) == pytest.approx([a, -a, -a, a], abs=1e-6)


def test_interleaved_group_ids():
    # group 7 at rows 0, 2, 4: rewards [1, 0, 1] -> mean 2/3, centered [1/3, -2/3, 1/3],
    #   sum sq 1/9 + 4/9 + 1/9 = 2/3, var (2/3) / 2 = 1/3, std sqrt(1/3)
    #   -> [1/3, -2/3, 1/3] / sqrt(1/3) = [0.57735, -1.15470, 0.57735]
    # group 3 at rows 1, 3, 5: rewards [2, 4, 6] -> mean 4, centered [-2, 0, 2],
    #   sum sq 8, var 8 / 2 = 4, std 2 -> [-1, 0, 1]
    s = math.sqrt(1 / 3) + EPS
    expected = [(1 / 3) / s, -2 / (2 + EPS), (-2 / 3) / s, 0.0, (1 / 3) / s, 2 / (2 + EPS)]
    got = adv([1, 2, 0, 4, 1, 6], [7, 3, 7, 3, 7, 3])
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[0] == pytest.approx(0.5773493, abs=1e-6)
    assert got[2] == pytest.approx(-1.1546986, abs=1e-6)


def test_group_ids_need_not_be_contiguous_or_small():
    # Same two groups as above with different (large, negative) ids: only membership matters.
    a = adv([1, 2, 0, 4, 1, 6], [7, 3, 7, 3, 7, 3])
    b = adv([1, 2, 0, 4, 1, 6], [-(2**40), 12345, -(2**40), 12345, -(2**40), 12345])
    assert a == b


def test_group_of_one_gets_zero():
    # Group 5 has a single response: no baseline exists, so its advantage is exactly 0
    # even though its reward (9) is far from everything else.
    got = adv([9.0, 1.0, 3.0], [5, 1, 1])
    # group 1: [1, 3] -> mean 2, centered [-1, 1], var 2 / 1 = 2, std sqrt(2)
    r = 1 / (math.sqrt(2) + EPS)
    assert got == pytest.approx([0.0, -r, r], abs=1e-6)
    assert got[0] == 0.0
    assert adv([3.5], [0]) == [0.0]
    assert adv([3.5], [0], normalize_std=False) == [0.0]


@pytest.mark.parametrize("value", [0.0, 1.0, -2.0, 0.5])
def test_identical_rewards_give_zero(value):
    # All-correct or all-wrong groups carry no signal: centered rewards are 0, std is 0.
    got = adv([value] * 4 + [0.0, 1.0], [0] * 4 + [1, 1])
    assert got[:4] == [0.0, 0.0, 0.0, 0.0]
    # group 1: [0, 1] -> mean 0.5, centered ±0.5, var 0.5 / 1, std sqrt(0.5) -> ±0.7071
    r = 0.5 / (math.sqrt(0.5) + EPS)
    assert got[4:] == pytest.approx([-r, r], abs=1e-6)


@pytest.mark.parametrize(("value", "n"), [(0.9, 3), (0.7, 7), (0.3, 6)])
def test_identical_non_dyadic_rewards_give_zero(value, n):
    assert adv([value] * n, [0] * n) == [0.0] * n


def test_dr_grpo_without_std_is_centered_rewards():
    # normalize_std=False: A = r - mean_g only.
    # group 0: [1, 0, 0, 1] -> mean 0.5 -> [0.5, -0.5, -0.5, 0.5]
    # group 1: [2, 4, 9] -> mean 5 -> [-3, -1, 4]; group 2: [7] -> 0 (7 - 7)
    got = adv([1, 2, 0, 4, 0, 9, 1, 7], [0, 1, 0, 1, 0, 1, 0, 2], normalize_std=False)
    assert got == pytest.approx([0.5, -3.0, -0.5, -1.0, -0.5, 4.0, 0.5, 0.0], abs=1e-6)


def test_eps_is_added_to_std():
    # group [0, 2]: centered [-1, 1], std sqrt(2); with eps = 1: -1 / (sqrt(2) + 1)
    got = adv([0, 2], [0, 0], eps=1.0)
    r = 1 / (math.sqrt(2) + 1)
    assert got == pytest.approx([-r, r], abs=1e-6)


def test_integer_rewards_are_accepted():
    out = grpo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))
    # [1, 0] -> mean 0.5, centered ±0.5, std sqrt(0.5 / 1) -> ±0.7071
    assert out.dtype == torch.float32
    r = 0.5 / (math.sqrt(0.5) + EPS)
    assert out.tolist() == pytest.approx([r, -r], abs=1e-6)


@pytest.mark.parametrize(
    ("rewards", "groups"),
    [
        (torch.zeros(4), torch.zeros(3, dtype=torch.long)),
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)),
        (torch.zeros(()), torch.zeros((), dtype=torch.long)),
    ],
)
def test_shape_mismatch_raises(rewards, groups):
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        grpo_advantages(rewards, groups)


# --- loop vs vectorised ----------------------------------------------------------------------


def naive_grpo(rewards: list[float], groups: list[int], eps: float, normalize_std: bool):
    """The textbook per-group loop, in float64."""
    out = [0.0] * len(rewards)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        rs = [float(rewards[i]) for i in idx]
        mean = sum(rs) / len(rs)
        if len(rs) == 1:
            continue  # no baseline: advantage 0
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
        for i, r in zip(idx, rs, strict=True):
            out[i] = (r - mean) / (std + eps) if normalize_std else r - mean
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_matches_naive_loop(seed, normalize_std):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 60, (1,), generator=gen))
    num_groups = int(torch.randint(1, 12, (1,), generator=gen))
    groups = torch.randint(0, num_groups, (n,), generator=gen) * 10 - 7  # sparse, negative ids
    if seed % 2:
        rewards = torch.randn(n, generator=gen) * 3
    else:  # discrete rewards: exercises all-equal groups (values are exact in float32)
        rewards = torch.randint(0, 3, (n,), generator=gen).float() / 2
    got = grpo_advantages(rewards, groups, normalize_std=normalize_std)
    expected = naive_grpo(rewards.tolist(), groups.tolist(), EPS, normalize_std)
    assert got.tolist() == pytest.approx(expected, abs=2e-5)


def close(got: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=atol, rtol=0)


# --- RLOO -------------------------------------------------------------------------------------


def test_rloo_hand_computed():
    # A_i = r_i - mean of the *other* rewards in the group.
    # group 0 [1, 0, 0, 1]: r=1 -> 1 - (0+0+1)/3 = 2/3; r=0 -> 0 - (1+0+1)/3 = -2/3
    # group 1 [2, 4, 9]:    2 - (4+9)/2 = -4.5; 4 - (2+9)/2 = -1.5; 9 - (2+4)/2 = 6
    # group 2 [7]: no other sample, no baseline -> 0
    got = rloo_advantages(
        torch.tensor([1.0, 2, 0, 4, 0, 9, 1, 7]), torch.tensor([0, 1, 0, 1, 0, 1, 0, 2])
    )
    assert got.dtype == torch.float32
    third = 2 / 3
    assert got.tolist() == pytest.approx([third, -4.5, -third, -1.5, -third, 6.0, third, 0.0])


def test_rloo_is_scaled_grpo_mean_baseline():
    # A_i = G / (G - 1) * (r_i - mean_g): RLOO and Dr.GRPO differ by G / (G - 1) per group.
    rewards, groups = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.1]), torch.tensor([5, 5, 5, 9, 9])
    drgrpo = grpo_advantages(rewards, groups, normalize_std=False)
    scale = torch.tensor([3 / 2] * 3 + [2 / 1] * 2)
    torch.testing.assert_close(rloo_advantages(rewards, groups), drgrpo * scale)


def test_rloo_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        rloo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))


def naive_rloo(rewards: list[float], groups: list[int]) -> list[float]:
    out = []
    for i, (r, g) in enumerate(zip(rewards, groups, strict=True)):
        others = [
            rj for j, (rj, gj) in enumerate(zip(rewards, groups, strict=True)) if gj == g and j != i
        ]
        out.append(r - sum(others) / len(others) if others else 0.0)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_rloo_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 50, (1,), generator=gen))
    groups = torch.randint(0, int(torch.randint(1, 10, (1,), generator=gen)), (n,), generator=gen)
    rewards = torch.randn(n, generator=gen) * 2
    got = rloo_advantages(rewards, groups)
    assert got.tolist() == pytest.approx(naive_rloo(rewards.tolist(), groups.tolist()), abs=1e-5)


# --- token rewards and KL in the reward -------------------------------------------------------

MASK_2X4 = torch.tensor([[True, True, True, True], [True, True, False, False]])


def test_outcome_reward_sits_at_last_real_token():
    got = outcome_token_rewards(
        torch.tensor([1.0, -1.0, 5.0]),
        torch.tensor(
            [[True, True, True, True], [True, True, False, False], [False, False, False, False]]
        ),
    )
    # row 2 is an empty response: no token carries its reward
    assert got.tolist() == [[0, 0, 0, 1.0], [0, -1.0, 0, 0], [0, 0, 0, 0]]
    # a mask with a hole (tool output inside the response): still the last real token
    holed = outcome_token_rewards(torch.tensor([2.0]), torch.tensor([[True, False, True, False]]))
    assert holed.tolist() == [[0, 0, 2.0, 0]]
    assert outcome_token_rewards(
        torch.tensor([1.0]), torch.zeros(1, 0, dtype=torch.bool)
    ).shape == (
        1,
        0,
    )


def test_kl_penalized_rewards_subtract_coef_times_kl_per_token():
    # k1 = logp - ref = [[0.2, -0.4, 0.1, 0.0], [0.5, 0.3, (pad), (pad)]], kl_coef = 0.1
    # rewards = token_rewards - 0.1 * k1; padding keeps 0
    token_rewards = torch.tensor([[0, 0, 0, 1.0], [0, -1.0, 0, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-0.5, -0.7, -9.0, -9.0]])
    ref = torch.tensor([[-1.2, -1.6, -0.6, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    rewards, metrics = kl_penalized_rewards(token_rewards, logp, ref, MASK_2X4, 0.1, "k1")
    expected = [[-0.02, 0.04, -0.01, 1.0], [-0.05, -1.03, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected), atol=1e-6, rtol=0)
    # mean k1 over the 6 real tokens: (0.2 - 0.4 + 0.1 + 0 + 0.5 + 0.3) / 6 = 0.7 / 6
    assert metrics["reward/kl"].item() == pytest.approx(0.7 / 6, abs=1e-6)


# --- GAE --------------------------------------------------------------------------------------
# 2 x 4, gamma = 0.9, lambda = 0.8 (gamma * lambda = 0.72); V after the last real token is 0.
# row 0: V = [0.5, 1.0, -0.5, 2.0], outcome reward 1 at t = 3
#   delta_3 = 1 + 0          - 2.0  = -1.0
#   delta_2 = 0 + 0.9 * 2.0  + 0.5  =  2.3
#   delta_1 = 0 + 0.9 * -0.5 - 1.0  = -1.45
#   delta_0 = 0 + 0.9 * 1.0  - 0.5  =  0.4
#   A_3 = -1.0; A_2 = 2.3 - 0.72 = 1.58; A_1 = -1.45 + 0.72 * 1.58 = -0.3124;
#   A_0 = 0.4 + 0.72 * -0.3124 = 0.175072;   R = A + V = [0.675072, 0.6876, 1.08, 1.0]
# row 1 (two real tokens): V = [1.0, 0.5, pad 9, pad 9], outcome reward -1 at t = 1
#   delta_1 = -1 - 0.5 = -1.5; delta_0 = 0.9 * 0.5 - 1.0 = -0.55
#   A_1 = -1.5; A_0 = -0.55 + 0.72 * -1.5 = -1.63;   R = [-0.63, -1.0, 0, 0]
GAE_VALUES = torch.tensor([[0.5, 1.0, -0.5, 2.0], [1.0, 0.5, 9.0, 9.0]])
GAE_REWARDS = torch.tensor([1.0, -1.0])


def test_gae_hand_computed_2x4():
    token_rewards = outcome_token_rewards(GAE_REWARDS, MASK_2X4)
    adv, ret = gae_advantages(token_rewards, GAE_VALUES, MASK_2X4, gamma=0.9, lam=0.8)
    expected_adv = [[0.175072, -0.3124, 1.58, -1.0], [-1.63, -1.5, 0.0, 0.0]]
    expected_ret = [[0.675072, 0.6876, 1.08, 1.0], [-0.63, -1.0, 0.0, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected_adv), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor(expected_ret), atol=1e-6, rtol=0)
    assert adv.dtype == ret.dtype == torch.float32


def test_gae_lambda_one_is_monte_carlo_and_lambda_zero_is_td():
    token_rewards = outcome_token_rewards(GAE_REWARDS, MASK_2X4)
    # lambda = 1: A_t = G_t - V_t with G_t the discounted return: row 0 G = 0.9^(3-t) * 1
    adv, ret = gae_advantages(token_rewards, GAE_VALUES, MASK_2X4, gamma=0.9, lam=1.0)
    g = torch.tensor([[0.729, 0.81, 0.9, 1.0], [-0.9, -1.0, 0, 0]])
    torch.testing.assert_close(ret, g, atol=1e-6, rtol=0)
    torch.testing.assert_close(adv, (g - GAE_VALUES) * MASK_2X4, atol=1e-6, rtol=0)
    # lambda = 0: A_t = delta_t (one-step TD errors, listed above)
    adv, _ = gae_advantages(token_rewards, GAE_VALUES, MASK_2X4, gamma=0.9, lam=0.0)
    deltas = torch.tensor([[0.4, -1.45, 2.3, -1.0], [-0.55, -1.5, 0, 0]])
    torch.testing.assert_close(adv, deltas, atol=1e-6, rtol=0)


def naive_gae(rewards, values, mask, gamma, lam):
    """Per row, per real token, the textbook backward recursion in Python floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        real = [t for t in range(T) if mask[i][t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(real):
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            next_a = delta + gamma * lam * next_a
            next_v = values[i][t]
            adv[i][t], ret[i][t] = next_a, next_a + values[i][t]
    return adv, ret


@pytest.mark.parametrize("seed", range(8))
def test_gae_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    B, T = (int(x) for x in torch.randint(1, 12, (2,), generator=gen))
    gamma, lam = float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen))
    if seed % 2:  # right-padded ragged rows (as tensors.py builds them), some empty
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
    else:  # masks with holes (e.g. tool output inside a response): skipped, not states
        mask = torch.rand(B, T, generator=gen) > 0.3
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(exp_adv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, torch.tensor(exp_ret), atol=1e-5, rtol=1e-5)


def test_discounted_returns():
    # rewards [[1, 0, 2], [0, 3, pad]], gamma 0.5: row 0 G = [1 + 0.5*0 + 0.25*2, 0 + 0.5*2, 2]
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = discounted_returns(rewards, mask, gamma=0.5)
    close(got, [[1.5, 1.0, 2.0], [1.5, 3.0, 0.0]])


# --- whitening and REINFORCE++ ----------------------------------------------------------------


def test_masked_whiten_exact():
    # real values [1, 1, -1, 0.5]: mean 0.375, deviations [0.625, 0.625, -1.375, 0.125],
    # squares sum 0.390625 * 2 + 1.890625 + 0.015625 = 2.6875, unbiased var 2.6875 / 3
    x = torch.tensor([[1.0, 1.0], [-1.0, 99.0], [0.5, -99.0]])
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    std = math.sqrt(2.6875 / 3 + 1e-8)
    expected = [[0.625 / std, 0.625 / std], [-1.375 / std, 0.0], [0.125 / std, 0.0]]
    close(masked_whiten(x, mask), expected)


def test_reinforce_pp_whitens_returns_over_all_tokens():
    # outcome rewards [1, -1, 0.5] on responses of 2, 1, 1 tokens, gamma = 1:
    # returns [[1, 1], [-1, pad], [0.5, pad]]; whitened as in test_masked_whiten_exact
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    token_rewards = outcome_token_rewards(torch.tensor([1.0, -1.0, 0.5]), mask)
    adv, ret = reinforce_pp_advantages(token_rewards, mask)
    assert ret.tolist() == [[1.0, 1.0], [-1.0, 0.0], [0.5, 0.0]]
    std = math.sqrt(2.6875 / 3 + 1e-8)
    expected = [[0.625 / std, 0.625 / std], [-1.375 / std, 0.0], [0.125 / std, 0.0]]
    close(adv, expected)
    # over real tokens the advantages have mean 0 and unbiased variance ~1
    real = adv[mask].double()
    assert real.mean().item() == pytest.approx(0.0, abs=1e-7)
    assert real.var().item() == pytest.approx(1.0, abs=1e-6)


def test_reinforce_pp_with_discount_and_kl_penalty():
    # gamma = 0.5, one response of 2 tokens with reward 1 and k1 penalty 0.1 * [0.2, -0.4]:
    # token rewards [-0.02, 1.04]; returns G_1 = 1.04, G_0 = -0.02 + 0.5 * 1.04 = 0.5
    # second response, 1 token, reward 0: return 0.
    mask = torch.tensor([[True, True], [True, False]])
    token_rewards = outcome_token_rewards(torch.tensor([1.0, 0.0]), mask)
    logp, ref = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]]), torch.tensor([[-1.2, -1.6], [-1.0, 0.0]])
    token_rewards, _ = kl_penalized_rewards(token_rewards, logp, ref, mask, 0.1, "k1")
    adv, ret = reinforce_pp_advantages(token_rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.5, 1.04], [0.0, 0.0]]), atol=1e-6, rtol=0)
    # returns over 3 real tokens [0.5, 1.04, 0]: mean 0.5133..., whitened
    vals = [0.5, 1.04, 0.0]
    mean = sum(vals) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2 + 1e-8)
    expected = [[(0.5 - mean) / std, (1.04 - mean) / std], [(0.0 - mean) / std, 0.0]]
    close(adv, expected, atol=1e-5)


def test_reinforce_pp_baseline_centres_by_group_then_whitens():
    # group 0 rewards [1, 0] -> centred [0.5, -0.5]; group 1 [2] -> 0 (a group of one)
    # tokens: row 0 has 2, row 1 has 1, row 2 has 1 -> values [0.5, 0.5, -0.5, 0]
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    adv, ret = reinforce_pp_baseline_advantages(
        torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 0, 1]), mask
    )
    assert ret.tolist() == [[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0]]
    mean = 0.125  # (0.5 + 0.5 - 0.5 + 0) / 4
    std = math.sqrt((0.375**2 * 2 + 0.625**2 + 0.125**2) / 3 + 1e-8)
    expected = [[0.375 / std, 0.375 / std], [-0.625 / std, 0.0], [-mean / std, 0.0]]
    close(adv, expected)


# --- the registry -----------------------------------------------------------------------------


def registry_inputs(B: int, T: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 3, (B,), generator=gen).float()
    return {
        "rewards": rewards,
        "group_ids": torch.arange(B) // 3,
        "token_rewards": outcome_token_rewards(rewards, mask),
        "values": torch.randn(B, T, generator=gen),
        "mask": mask,
    }


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_registry_entries_run_on_their_declared_inputs(name):
    est = ADVANTAGE_ESTIMATORS[name]
    assert set(est.inputs) <= set(ESTIMATOR_INPUTS)
    assert "mask" in est.inputs
    data = registry_inputs(B=9, T=5, seed=1)
    adv, ret = est.fn(**{k: data[k] for k in est.inputs})
    mask = data["mask"]
    assert adv.shape == ret.shape == (9, 5)
    assert adv.dtype == ret.dtype == torch.float32
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    if not est.per_token:  # one value along each response
        first = adv[:, :1].expand_as(adv)
        torch.testing.assert_close(adv[mask], first[mask])


def test_registry_matches_the_plain_functions():
    data = registry_inputs(B=9, T=5, seed=2)
    r, g, m = data["rewards"], data["group_ids"], data["mask"]
    grpo, _ = ADVANTAGE_ESTIMATORS["grpo"].fn(rewards=r, group_ids=g, mask=m)
    torch.testing.assert_close(grpo[:, 0], grpo_advantages(r, g))
    dr, _ = ADVANTAGE_ESTIMATORS["drgrpo"].fn(rewards=r, group_ids=g, mask=m)
    torch.testing.assert_close(dr[:, 0], grpo_advantages(r, g, normalize_std=False))
    rloo, _ = ADVANTAGE_ESTIMATORS["rloo"].fn(rewards=r, group_ids=g, mask=m)
    torch.testing.assert_close(rloo[:, 0], rloo_advantages(r, g))
