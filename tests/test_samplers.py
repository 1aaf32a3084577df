"""Samplers and rank splitting as pure functions: literal arrays in, sample ids out."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.errors import QueueError
from asyncflow.runtime.queue import samplers
from asyncflow.runtime.queue.samplers import Candidates, balanced_split, split_for_ranks


def sums(lengths: list[int], parts: list[np.ndarray]) -> list[int]:
    return [int(np.asarray(lengths, dtype=np.int64)[p].sum()) for p in parts]


def spread(lengths: list[int], parts: list[np.ndarray]) -> int:
    s = sums(lengths, parts)
    return max(s) - min(s)


def assert_is_partition(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    for part in parts:
        assert part.dtype == np.int64
        assert part.tolist() == sorted(part.tolist())
    everything = sorted(i for part in parts for i in part.tolist())
    assert everything == list(range(n)), "every index exactly once"


# ---- token_budget ------------------------------------------------------------------------


def test_token_budget_takes_rows_in_order_while_they_fit() -> None:
    cands = Candidates.build([10, 11, 12, 13], lengths=[3, 4, 5, 1])
    assert samplers.token_budget(7)(cands, None).tolist() == [10, 11]
    assert samplers.token_budget(6)(cands, None).tolist() == [10]
    assert samplers.token_budget(13)(cands, None).tolist() == [10, 11, 12, 13]
    assert samplers.token_budget(1000)(cands, 3).tolist() == [10, 11, 12]  # batch_size caps
    assert samplers.token_budget(3)(cands, None).tolist() == [10]  # exactly on budget


def test_token_budget_always_takes_one_row_even_over_budget() -> None:
    cands = Candidates.build([4, 5], lengths=[50, 1])
    assert samplers.token_budget(8)(cands, None).tolist() == [4]
    assert samplers.token_budget(8)(Candidates.build([], lengths=[]), None).tolist() == []


def test_token_budget_counts_empty_rows_as_free() -> None:
    cands = Candidates.build([0, 1, 2, 3], lengths=[0, 0, 5, 0])
    assert samplers.token_budget(5)(cands, None).tolist() == [0, 1, 2, 3]


def test_token_budget_needs_known_lengths_for_rows_it_looks_at() -> None:
    cands = Candidates.build([7, 8, 9], lengths=[2, None, 4])
    with pytest.raises(QueueError, match=r"token_budget\(5\): sample ids \[8\]"):
        samplers.token_budget(5)(cands, None)
    # rows past the one that stops the batch are not looked at
    over = Candidates.build([7, 8, 9], lengths=[2, None, None])
    assert samplers.token_budget(1)(over, None).tolist() == [7]
    fits = Candidates.build([7, 8, 9], lengths=[2, 5, None])
    assert samplers.token_budget(4)(fits, None).tolist() == [7]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None])
def test_token_budget_rejects_a_bad_budget(bad) -> None:
    with pytest.raises(QueueError, match="max_tokens must be an int >= 1"):
        samplers.token_budget(bad)


def test_token_budget_is_named_for_errors() -> None:
    assert samplers.token_budget(64).__name__ == "token_budget(64)"


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 50), max_size=20),
    budget=st.integers(1, 120),
    batch_size=st.none() | st.integers(1, 8),
)
def test_token_budget_is_the_longest_prefix_that_fits(lengths, budget, batch_size) -> None:
    cands = Candidates.build(range(len(lengths)), lengths=lengths)
    chosen = samplers.token_budget(budget)(cands, batch_size).tolist()
    limit = len(lengths) if batch_size is None else min(batch_size, len(lengths))
    assert chosen == list(range(len(chosen)))  # a prefix, in order
    assert len(chosen) <= limit
    if limit:
        assert chosen, "at least one row"
    if len(chosen) > 1:
        assert sum(lengths[: len(chosen)]) <= budget
    if len(chosen) < limit:  # the next row would not fit
        assert sum(lengths[: len(chosen) + 1]) > budget


# ---- balanced_split ----------------------------------------------------------------------


@pytest.mark.parametrize("method", samplers.BALANCE_METHODS)
def test_balanced_split_is_a_partition_with_k_parts(method) -> None:
    lengths = [9, 1, 4, 4, 7, 3, 2, 8]
    parts = balanced_split(np.array(lengths), 3, method)
    assert_is_partition(parts, len(lengths), 3)
    assert spread(lengths, parts) <= 1  # 46 tokens: 16/15/15 is reachable


@pytest.mark.parametrize("method", samplers.BALANCE_METHODS)
def test_balanced_split_fills_every_part_when_items_suffice(method) -> None:
    parts = balanced_split([5, 0, 0], 3, method)  # zero-length rows still spread out
    assert sorted(len(p) for p in parts) == [1, 1, 1]
    fewer = balanced_split([5, 2], 4, method)
    assert_is_partition(fewer, 2, 4)
    assert sorted(len(p) for p in fewer) == [0, 0, 1, 1]
    assert balanced_split([], 2, method)[0].tolist() == []


def test_karmarkar_karp_differences_the_largest_pair_first() -> None:
    # 8,7 -> 1; 6,5 -> 1; 4,1 -> 3; 3,1 -> 2: {8,6} vs {7,5,4} (greedy gets 17 vs 13)
    lengths = [8, 7, 6, 5, 4]
    kk = balanced_split(lengths, 2, "karmarkar_karp")
    assert sorted(sums(lengths, kk)) == [14, 16]
    lpt = balanced_split(lengths, 2, "longest_first")
    assert sorted(sums(lengths, lpt)) == [13, 17]


def brute_force_2way(lengths: list[int]) -> int:
    total = sum(lengths)
    best = total
    for mask in itertools.product([0, 1], repeat=len(lengths)):
        side = sum(w for w, m in zip(lengths, mask, strict=True) if m)
        best = min(best, abs(total - 2 * side))
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=4))
def test_karmarkar_karp_is_optimal_for_two_ranks_and_up_to_four_items(lengths) -> None:
    parts = balanced_split(lengths, 2, "karmarkar_karp")
    assert_is_partition(parts, len(lengths), 2)
    assert spread(lengths, parts) == brute_force_2way(lengths)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 500), max_size=25), k=st.integers(1, 6))
def test_both_methods_partition_and_stay_within_the_longest_item(lengths, k) -> None:
    for method in samplers.BALANCE_METHODS:
        parts = balanced_split(lengths, k, method)
        assert_is_partition(parts, len(lengths), k)
        if len(lengths) >= k:
            assert all(len(p) for p in parts)
            # differencing and greedy both keep the spread within one item
            assert spread(lengths, parts) <= max(lengths)


def test_karmarkar_karp_beats_longest_first_on_random_inputs() -> None:
    """KK wins or ties nearly always and is far better in total, yet does not dominate.

    "Never worse" is not a theorem (pinned below), so the claim tested is the one that
    holds: on 600 seeded random inputs KK is no worse in >= 95% of them and its summed
    spread is under three quarters of greedy's (0.62 measured).
    """
    rng = np.random.default_rng(0)
    no_worse = total_kk = total_lpt = 0
    trials = 600
    for _ in range(trials):
        k = int(rng.integers(2, 6))
        lengths = rng.integers(1, 2000, size=int(rng.integers(k, 40))).tolist()
        kk = spread(lengths, balanced_split(lengths, k, "karmarkar_karp"))
        lpt = spread(lengths, balanced_split(lengths, k, "longest_first"))
        no_worse += kk <= lpt
        total_kk += kk
        total_lpt += lpt
    assert no_worse >= 0.95 * trials
    assert 4 * total_kk <= 3 * total_lpt


def test_karmarkar_karp_can_lose_to_longest_first() -> None:
    lengths = [959, 400, 852, 292, 49, 662, 582, 691, 816]
    kk = spread(lengths, balanced_split(lengths, 2, "karmarkar_karp"))
    lpt = spread(lengths, balanced_split(lengths, 2, "longest_first"))
    assert (kk, lpt) == (5, 3)


def test_balanced_split_rejects_bad_input() -> None:
    with pytest.raises(QueueError, match=r"unknown balance method 'best'.*karmarkar_karp"):
        balanced_split([1, 2], 2, "best")
    with pytest.raises(QueueError, match="k must be an int >= 1, got 0"):
        balanced_split([1, 2], 0)
    with pytest.raises(QueueError, match="lengths must be >= 0"):
        balanced_split([1, -2], 2)
    with pytest.raises(QueueError, match="flat array of ints"):
        balanced_split([1.5, 2.0], 2)


# ---- split_for_ranks ---------------------------------------------------------------------


def test_split_for_ranks_balances_tokens() -> None:
    cands = Candidates.build([10, 11, 12, 13, 14, 15], lengths=[9, 1, 1, 1, 5, 5])
    parts = split_for_ranks(cands, 2, "karmarkar_karp", whole_groups=False)
    assert sorted(sums([9, 1, 1, 1, 5, 5], [p - 10 for p in parts])) == [11, 11]
    assert sorted(i for p in parts for i in p.tolist()) == list(range(10, 16))


def test_split_for_ranks_never_tears_a_group() -> None:
    cands = Candidates.build(
        [0, 1, 2, 3, 4, 5, 6], group_ids=[1, 1, 1, 2, 2, None, 3], lengths=[5, 5, 5, 1, 1, 9, 1]
    )
    parts = split_for_ranks(cands, 3, "karmarkar_karp", whole_groups=True)
    assert sorted(p.tolist() for p in parts) == [[0, 1, 2], [3, 4, 6], [5]]
    torn = split_for_ranks(cands, 7, "karmarkar_karp", whole_groups=False)
    assert len(torn) == 7  # rows, not groups, are the units


def test_split_for_ranks_in_order_without_balance() -> None:
    cands = Candidates.build([3, 4, 5, 6, 7], lengths=[100, 1, 1, 1, 1])
    parts = split_for_ranks(cands, 2, None, whole_groups=False)
    assert [p.tolist() for p in parts] == [[3, 4, 5], [6, 7]]


def test_split_for_ranks_uses_row_counts_when_a_length_is_unknown() -> None:
    cands = Candidates.build([0, 1, 2, 3], lengths=[100, None, 1, 1])
    parts = split_for_ranks(cands, 2, "karmarkar_karp", whole_groups=False)
    assert sorted(len(p) for p in parts) == [2, 2]


def test_split_for_ranks_returns_no_empty_parts() -> None:
    cands = Candidates.build([0, 1], lengths=[3, 4])
    parts = split_for_ranks(cands, 5, "longest_first", whole_groups=False)
    assert sorted(p.tolist() for p in parts) == [[0], [1]]
    assert split_for_ranks(Candidates.build([]), 3, None, whole_groups=False) == []


def test_split_for_ranks_rejects_bad_input() -> None:
    cands = Candidates.build([0, 1])
    with pytest.raises(QueueError, match="ranks must be an int >= 1, got 0"):
        split_for_ranks(cands, 0, None, whole_groups=False)
    with pytest.raises(QueueError, match="unknown balance method 'fair'"):
        split_for_ranks(cands, 2, "fair", whole_groups=False)


@settings(max_examples=150, deadline=None)
@given(
    groups=st.lists(st.none() | st.integers(0, 5), max_size=25),
    ranks=st.integers(1, 5),
    balance=st.sampled_from([None, *samplers.BALANCE_METHODS]),
    data=st.data(),
)
def test_split_for_ranks_properties(groups, ranks, balance, data) -> None:
    lengths = data.draw(st.lists(st.integers(0, 60), min_size=len(groups), max_size=len(groups)))
    ids = list(range(100, 100 + len(groups)))
    cands = Candidates.build(ids, group_ids=groups, lengths=lengths)
    parts = split_for_ranks(cands, ranks, balance, whole_groups=True)
    units = len({g for g in groups if g is not None}) + groups.count(None)
    assert len(parts) == min(ranks, units)
    assert all(len(p) for p in parts)
    assert sorted(i for p in parts for i in p.tolist()) == ids
    for part in parts:
        assert part.tolist() == sorted(part.tolist())
    rank_of = {i: r for r, p in enumerate(parts) for i in p.tolist()}
    for g in {g for g in groups if g is not None}:
        assert len({rank_of[i] for i, x in zip(ids, groups, strict=True) if x == g}) == 1


# ---- candidates helpers ------------------------------------------------------------------


def test_candidates_subset_keeps_columns_aligned() -> None:
    cands = Candidates.build([1, 2, 3], group_ids=[7, None, 7], lengths=[4, 5, 6])
    sub = cands.subset(np.array([2, 0]))
    assert sub.sample_ids.tolist() == [3, 1]
    assert sub.lengths.tolist() == [6, 4]
    assert sub.grouped.tolist() == [True, True]
    assert sub.group_sizes.tolist() == [2, 2]


def test_group_preserving_is_marked_as_keeping_groups() -> None:
    assert samplers.keeps_groups(samplers.group_preserving)
    assert not samplers.keeps_groups(samplers.sequential)
    assert not samplers.keeps_groups(samplers.token_budget(10))
