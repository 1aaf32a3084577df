"""Which ready rows go into the next micro-batch.

Samplers are pure functions over a columnar view of the candidate rows, so a scheduling
policy can be tested with a few literal arrays, without a queue, Arrow data or a cluster.
The queue validates what a sampler returns (a subset of the candidates, no duplicates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


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
