"""Which ready rows go into the next micro-batch, and how a batch is shared between ranks.

Samplers are pure functions over a columnar view of the candidate rows, so a scheduling
policy can be tested with a few literal arrays, without a queue, Arrow data or a cluster.
The queue validates what a sampler returns (a subset of the candidates, no duplicates).
The same holds for splitting one batch across data-parallel ranks (`balanced_split`,
`split_for_ranks`): the scheduler extension and the in-process queue share these functions,
so they cannot disagree on who gets which rows.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from asyncflow.errors import QueueError

# Ways to split one batch across ranks by token count; None in the queue means "in order".
BALANCE_METHODS = ("karmarkar_karp", "longest_first")


@dataclass(frozen=True)
class Candidates:
    """Rows a task may take now, oldest (smallest sample id) first; all arrays aligned.

    Columnar rather than a list of records so samplers can stay vectorised at 10^5 rows.
    """

    sample_ids: np.ndarray  # int64[n], increasing
    group_ids: np.ndarray  # int64[n]; meaningful only where `grouped`
    grouped: np.ndarray  # bool[n]; False = the row belongs to no group
    group_sizes: np.ndarray  # int64[n]; rows of the candidate's group the task has yet to take
    #                         (ready or not); 1 for ungrouped rows
    lengths: np.ndarray  # int64[n]; token count, -1 if unknown
    policy_versions: np.ndarray  # int64[n]; policy version that produced the row, -1 if unknown

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, index: np.ndarray) -> Candidates:
        """The candidates at `index` (positions or a bool mask), in that order."""
        return Candidates(
            sample_ids=self.sample_ids[index],
            group_ids=self.group_ids[index],
            grouped=self.grouped[index],
            group_sizes=self.group_sizes[index],
            lengths=self.lengths[index],
            policy_versions=self.policy_versions[index],
        )

    @classmethod
    def build(
        cls,
        sample_ids: Sequence[int],
        group_ids: Sequence[int | None] | None = None,
        group_sizes: Sequence[int] | None = None,
        lengths: Sequence[int | None] | None = None,
        policy_versions: Sequence[int | None] | None = None,
    ) -> Candidates:
        """Convenience constructor from plain lists (None = no group / unknown).

        Without `group_sizes`, every group is taken to be exactly its candidate rows, i.e.
        complete.
        """
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        raw_groups = [None] * n if group_ids is None else list(group_ids)
        grouped = np.array([g is not None for g in raw_groups], dtype=bool).reshape(-1)
        groups = np.array([0 if g is None else g for g in raw_groups], dtype=np.int64).reshape(-1)
        if group_sizes is None:
            sizes = np.ones(n, dtype=np.int64)
            if grouped.any():
                _, inverse, counts = np.unique(
                    groups[grouped], return_inverse=True, return_counts=True
                )
                sizes[grouped] = counts[inverse]
        else:
            sizes = np.asarray(group_sizes, dtype=np.int64).reshape(-1)
        return cls(
            sample_ids=ids,
            group_ids=groups,
            grouped=grouped,
            group_sizes=sizes,
            lengths=_optional_ints(lengths, n),
            policy_versions=_optional_ints(policy_versions, n),
        )


def _optional_ints(values: Sequence[int | None] | None, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, -1, dtype=np.int64)
    return np.array([-1 if v is None else v for v in values], dtype=np.int64).reshape(-1)


class Sampler(Protocol):
    """Pick the sample ids of the next micro-batch from `candidates`.

    `batch_size` counts rows; None means "as many as the policy allows". Return an int64
    array of chosen ids (a subset of `candidates.sample_ids`); empty means "nothing yet".
    """

    def __call__(self, candidates: Candidates, batch_size: int | None) -> np.ndarray: ...


def sequential(candidates: Candidates, batch_size: int | None) -> np.ndarray:
    """Oldest rows first, ignoring groups: the FIFO baseline."""
    ids = candidates.sample_ids
    return ids.copy() if batch_size is None else ids[:batch_size].copy()


def group_preserving(candidates: Candidates, batch_size: int | None) -> np.ndarray:
    """Whole, complete groups only, oldest group first (GRPO needs every sibling).

    A group is complete when all rows of it the task has yet to take are candidates.
    Groups are taken in order while they fit in `batch_size`; the first group that does not
    fit stops the batch (no skipping ahead, so large groups are not starved), except that at
    least one complete group is always returned. Ungrouped rows count as groups of one.
    """
    n = len(candidates)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    unit = _unit_of_each_row(candidates)  # int64[n], dense 0..units-1
    counts = np.bincount(unit)  # int64[units]: candidates per unit
    size = np.zeros(len(counts), dtype=np.int64)
    size[unit] = candidates.group_sizes  # rows per unit still owed
    first = np.full(len(counts), n, dtype=np.int64)
    np.minimum.at(first, unit, np.arange(n))  # oldest candidate of each unit
    complete = np.flatnonzero(counts >= size)
    if len(complete) == 0:
        return np.empty(0, dtype=np.int64)
    order = complete[np.argsort(first[complete], kind="stable")]
    take = len(order)
    if batch_size is not None:
        fits = np.cumsum(counts[order]) <= batch_size
        take = max(1, int(np.argmin(fits)) if not fits.all() else len(order))
    chosen = np.isin(unit, order[:take])
    return candidates.sample_ids[chosen]


# Splitting a batch across ranks must not tear a group apart when the sampler promised whole
# groups; the queue reads this marker rather than guessing from the rows.
group_preserving.keeps_groups = True  # type: ignore[attr-defined]


def keeps_groups(sampler: Sampler) -> bool:
    """Whether `sampler` hands out whole groups only (see `group_preserving`)."""
    return bool(getattr(sampler, "keeps_groups", False))


def token_budget(max_tokens: int) -> Sampler:
    """A sampler taking the oldest rows while their summed token lengths stay <= max_tokens.

    Micro-batches sized by tokens rather than rows keep activation memory flat when response
    lengths vary by 10x. The first row is always taken, even if it alone is over budget,
    so an over-long row cannot stall its task forever; `batch_size` still caps the rows.
    Every row it has to look at needs a known length (the queue's length columns written):
    a budget that silently did not apply would be worse than an error.
    """
    if not _is_int(max_tokens) or max_tokens < 1:
        raise QueueError(f"token_budget: max_tokens must be an int >= 1, got {max_tokens!r}")
    budget = int(max_tokens)

    def sampler(candidates: Candidates, batch_size: int | None) -> np.ndarray:
        n = len(candidates) if batch_size is None else min(len(candidates), batch_size)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        lengths = candidates.lengths[:n]
        spent = np.cumsum(np.maximum(lengths, 0))
        take = max(1, int(np.searchsorted(spent, budget, side="right")))
        # The row that did not fit decided the stop too, unless the first row alone was over.
        looked = take + 1 if take < n and spent[take - 1] <= budget else take
        unknown = lengths[:looked] < 0
        if unknown.any():
            ids = ", ".join(str(i) for i in candidates.sample_ids[:looked][unknown][:8])
            raise QueueError(
                f"{sampler.__name__}: sample ids [{ids}] have no known token length "
                "(none of the queue's length columns was written for them)"
            )
        return candidates.sample_ids[:take].copy()

    sampler.__name__ = sampler.__qualname__ = f"token_budget({budget})"
    return sampler


def balanced_split(
    lengths: np.ndarray | Sequence[int], k: int, method: str = "karmarkar_karp"
) -> list[np.ndarray]:
    """Split item indices into `k` parts whose summed lengths are as equal as possible.

    Data-parallel ranks wait for the slowest one, and a rank's time grows with its tokens,
    so the spread (largest minus smallest part) is what costs. Exact partitioning is
    NP-hard; two classic heuristics are offered:

    - "karmarkar_karp": the largest differencing method, k-way (Michiels, Korst, Aarts,
      van Leeuwen). Every item starts as a k-tuple of parts (itself and k-1 empty ones);
      the two tuples with the largest spread are merged, pairing the fullest part of one
      with the emptiest of the other, until one tuple is left. Optimal for k=2 with up to
      four items, and usually far better than greedy on many items - but not always
      (neither heuristic dominates; tests pin a counterexample).
    - "longest_first": greedy LPT, each item, longest first, to the currently lightest part.

    Returns `k` int64 arrays of indices into `lengths`, each ascending (so a part read in
    order stays a zero-copy slice where possible). With at least `k` items every part is
    non-empty, zero-length items included: ties between equal sums go to the part with
    fewer items.
    """
    weights = np.asarray(lengths)
    if weights.ndim != 1 or (weights.size and not np.issubdtype(weights.dtype, np.integer)):
        raise QueueError(
            f"balanced_split: lengths must be a flat array of ints, got {weights.dtype} "
            f"with shape {weights.shape}"
        )
    if not _is_int(k) or k < 1:
        raise QueueError(f"balanced_split: k must be an int >= 1, got {k!r}")
    if method not in BALANCE_METHODS:
        raise QueueError(
            f"balanced_split: unknown balance method {method!r} (known: {list(BALANCE_METHODS)})"
        )
    if (weights < 0).any():
        raise QueueError("balanced_split: lengths must be >= 0")
    values = [int(w) for w in weights.tolist()]
    if method == "karmarkar_karp":
        parts = _karmarkar_karp(values, int(k))
    else:
        parts = _longest_first(values, int(k))
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def _karmarkar_karp(weights: list[int], k: int) -> list[list[int]]:
    # A tuple is k parts (sum, count, items) sorted fullest first (ties: more items first),
    # keyed in the heap by its spread; the counter keeps ties in insertion order.
    if not weights:
        return [[] for _ in range(k)]
    order = itertools.count()
    heap: list[tuple[int, int, list[tuple[int, int, list[int]]]]] = []
    for i, w in enumerate(weights):
        parts = [(w, 1, [i])] + [(0, 0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-w, next(order), parts))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [
            (a[i][0] + b[k - 1 - i][0], a[i][1] + b[k - 1 - i][1], a[i][2] + b[k - 1 - i][2])
            for i in range(k)
        ]
        merged.sort(key=lambda part: (-part[0], -part[1]))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next(order), merged))
    return [items for _, _, items in heap[0][2]]


def _longest_first(weights: list[int], k: int) -> list[list[int]]:
    sums = [0] * k
    parts: list[list[int]] = [[] for _ in range(k)]
    # Longest first; equal lengths keep index order so the result is deterministic.
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        j = min(range(k), key=lambda j: (sums[j], len(parts[j]), j))
        sums[j] += weights[i]
        parts[j].append(i)
    return parts


def split_for_ranks(
    chosen: Candidates, ranks: int, balance: str | None, whole_groups: bool
) -> list[np.ndarray]:
    """Share the rows of one sampled batch between `ranks`; return their sample ids per rank.

    The indivisible unit is a row, or a whole group when `whole_groups` (GRPO needs every
    sibling on the rank that normalises them). Units are balanced by tokens when every row
    has a known length, else by row count (a budget on unknown lengths would be noise).
    `balance=None` deals units out in order, in contiguous runs. Only non-empty parts are
    returned, so there are min(ranks, units) of them; each part keeps sample-id order.
    """
    if not _is_int(ranks) or ranks < 1:
        raise QueueError(f"ranks must be an int >= 1, got {ranks!r}")
    if balance is not None and balance not in BALANCE_METHODS:
        raise QueueError(
            f"unknown balance method {balance!r} (known: {list(BALANCE_METHODS)} or None)"
        )
    n = len(chosen)
    if n == 0:
        return []
    unit = _unit_of_each_row(chosen) if whole_groups else np.arange(n, dtype=np.int64)
    # Number units by their oldest row so "in order" means sample-id order.
    first = np.full(int(unit.max()) + 1, n, dtype=np.int64)
    np.minimum.at(first, unit, np.arange(n))
    rank_of_unit = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    unit = rank_of_unit[unit]
    units = len(first)
    parts = min(int(ranks), units)
    if balance is None:
        unit_parts = np.array_split(np.arange(units, dtype=np.int64), parts)
    else:
        weights = chosen.lengths if (chosen.lengths >= 0).all() else np.ones(n, dtype=np.int64)
        unit_weights = np.bincount(unit, weights=weights, minlength=units).astype(np.int64)
        unit_parts = balanced_split(unit_weights, parts, balance)
    order = np.argsort(chosen.sample_ids, kind="stable")
    out = []
    for members in unit_parts:
        rows = order[np.isin(unit[order], members)]
        out.append(chosen.sample_ids[rows].copy())
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _unit_of_each_row(candidates: Candidates) -> np.ndarray:
    """Number the indivisible units: one per group id, one per ungrouped row."""
    n = len(candidates)
    unit = np.empty(n, dtype=np.int64)
    grouped = candidates.grouped
    _, inverse = np.unique(candidates.group_ids[grouped], return_inverse=True)
    num_groups = int(inverse.max()) + 1 if len(inverse) else 0
    unit[grouped] = inverse.reshape(-1)
    unit[~grouped] = num_groups + np.arange(int(np.count_nonzero(~grouped)))
    return unit
