"""asyncflow.operators.advantages.grpo_advantages against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from asyncflow.operators.advantages import grpo_advantages

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
