"""Queue metadata: which rows exist, which of their columns are ready, what each task took.

No Arrow data lives here, only plain dicts, sets and numpy arrays (plus the Arrow *types* of
the declared columns). That split lets the controller move into a Dask scheduler extension --
one hop from every worker and surviving worker deaths, like Dask's own Queue and Semaphore --
while the bytes stay with the storage on the workers that produced them.

Rows of a partition are addressed internally by *position* (insertion order). Sample ids are
global and strictly increasing, and a partition only ever appends, so a partition's id array
is sorted and id -> position is a binary search. Every per-row array below is indexed by
position and over-allocated (capacity doubling) so appending rows stays amortised O(rows).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from asyncflow.errors import QueueError
from asyncflow.runtime.queue.samplers import Candidates

# Per-task state of a row.
FREE, LEASED, CONSUMED = np.int8(0), np.int8(1), np.int8(2)

# How many retired lease ids keep a reason for better error messages (bounded memory).
_RETIRED_MEMORY = 10_000


def format_ids(ids: Iterable[int], limit: int = 8) -> str:
    """Show the first few ids: errors must point at rows without flooding the terminal."""
    ids = [int(i) for i in ids]
    head = ", ".join(str(i) for i in ids[:limit])
    more = f", ... (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return f"[{head}{more}]"


def grown(array: np.ndarray, capacity: int, fill: object) -> np.ndarray:
    """A copy of `array` enlarged to `capacity`, new slots set to `fill`."""
    out = np.full(capacity, fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


class RowIndex:
    """The sample ids of one partition, in insertion order, mapped to positions.

    Ids are appended in increasing order (the queue hands them out from one global counter),
    so the array stays sorted and lookups are `np.searchsorted`, vectorised over many ids.
    """

    def __init__(self) -> None:
        self._ids = np.empty(16, dtype=np.int64)  # int64[capacity]; valid prefix [:n]
        self.n = 0

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self.n]

    @property
    def capacity(self) -> int:
        return len(self._ids)

    def append(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self.n and ids[0] <= self._ids[self.n - 1]:
            raise RuntimeError("internal: sample ids must be appended in increasing order")
        need = self.n + len(ids)
        if need > len(self._ids):
            self._ids = grown(self._ids, max(need, 2 * len(self._ids)), 0)
        self._ids[self.n : need] = ids
        self.n = need

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (positions, found mask); positions are meaningless where not found."""
        known = self.ids
        pos = np.searchsorted(known, ids)
        found = pos < len(known)
        found[found] = known[pos[found]] == ids[found]
        return pos, found


@dataclass(frozen=True)
class RowMeta:
    """Per-row metadata pulled out of a written batch (by whoever holds the data).

    Arrays are aligned with the written rows; None means the batch did not carry that field.
    """

    group_ids: np.ndarray | None = None  # int64[n]; meaningful where `grouped`
    grouped: np.ndarray | None = None  # bool[n]; False where group_id is null
    policy_versions: np.ndarray | None = None  # int64[n]; -1 where null
    lengths: np.ndarray | None = None  # int64[n]; tokens in this batch's length columns


@dataclass(frozen=True)
class LeaseMeta:
    lease_id: int
    task: str
    partition: Hashable
    positions: np.ndarray  # int64[k] positions in the partition
    sample_ids: np.ndarray  # int64[k] in the order handed out


class PartitionMeta:
    """All metadata of one partition; arrays are int/bool[capacity], valid prefix [:rows.n]."""

    def __init__(self, name: Hashable) -> None:
        self.name = name
        self.rows = RowIndex()
        cap = self.rows.capacity
        # column -> declared Arrow type, in first-declaration order
        self.types: dict[str, pa.DataType] = {}
        # column -> bool[capacity]: data and metadata of that column committed for the row
        self.ready: dict[str, np.ndarray] = {}
        # column -> number of rows ready (kept so stats() is O(columns), not O(rows))
        self.ready_count: dict[str, int] = {}
        # column -> names of the producers that wrote it (for error messages)
        self.producers: dict[str, set[str]] = {}
        # task -> int8[capacity]: FREE, LEASED or CONSUMED for that task
        self.taken: dict[str, np.ndarray] = {}
        # int64[capacity] group id per row, meaningful where `grouped`; bool[capacity]
        self.group_ids = np.zeros(cap, dtype=np.int64)
        self.grouped = np.zeros(cap, dtype=bool)
        # int64[capacity] token count over the length columns written so far; -1 = unknown
        self.lengths = np.full(cap, -1, dtype=np.int64)
        # int64[capacity] policy version that produced the row; -1 = unknown
        self.policy_versions = np.full(cap, -1, dtype=np.int64)
        # lease ids currently outstanding on this partition
        self.leases: set[int] = set()

    @property
    def n(self) -> int:
        return self.rows.n

    def append_rows(self, ids: np.ndarray) -> np.ndarray:
        """Append rows; return their positions."""
        start = self.n
        self.rows.append(ids)
        cap = self.rows.capacity
        if cap > len(self.grouped):
            self.group_ids = grown(self.group_ids, cap, 0)
            self.grouped = grown(self.grouped, cap, False)
            self.lengths = grown(self.lengths, cap, -1)
            self.policy_versions = grown(self.policy_versions, cap, -1)
            self.ready = {c: grown(m, cap, False) for c, m in self.ready.items()}
            self.taken = {t: grown(s, cap, FREE) for t, s in self.taken.items()}
        return np.arange(start, self.n, dtype=np.int64)

    def ready_mask(self, columns: Sequence[str]) -> np.ndarray:
        """bool[n]: rows ready for every column; a never-declared column is ready nowhere."""
        mask = np.ones(self.n, dtype=bool)
        for col in columns:
            ready = self.ready.get(col)
            if ready is None:
                return np.zeros(self.n, dtype=bool)
            mask &= ready[: self.n]
        return mask

    def task_state(self, task: str) -> np.ndarray:
        state = self.taken.get(task)
        if state is None:
            state = self.taken[task] = np.zeros(self.rows.capacity, dtype=np.int8)
        return state


class Controller:
    """Validates every request against the metadata, then records it.

    `check_*` methods raise QueueError and change nothing; `commit_*` methods assume the
    matching check passed and the data is already stored, so a row becomes visible only once
    both data and metadata exist.
    """

    def __init__(self) -> None:
        # partition key -> its metadata, in creation order
        self._partitions: dict[Hashable, PartitionMeta] = {}
        # lease id -> lease metadata, for leases handed out and not yet acked/released
        self._leases: dict[int, LeaseMeta] = {}
        # lease id -> why it ended ("acked", "released", ...), last _RETIRED_MEMORY only
        self._retired: OrderedDict[int, str] = OrderedDict()
        self._next_sample_id = 0
        self._next_lease_id = 0

    # ---- partitions -------------------------------------------------------------------

    def partition(self, partition: Hashable) -> PartitionMeta:
        meta = self._partitions.get(partition)
        if meta is None:
            known = list(self._partitions)[:10]
            raise QueueError(f"unknown partition {partition!r} (known partitions: {known})")
        return meta

    def partitions(self) -> list[Hashable]:
        return list(self._partitions)

    def clear(self, partition: Hashable) -> None:
        meta = self.partition(partition)
        for lease_id in meta.leases:
            del self._leases[lease_id]
            self._retire(lease_id, f"its partition {partition!r} was cleared")
        del self._partitions[partition]

    # ---- writes -----------------------------------------------------------------------

    def check_types(self, partition: Hashable, types: dict[str, pa.DataType]) -> None:
        meta = self._partitions.get(partition)
        if meta is None:
            return
        for col, got in types.items():
            expected = meta.types.get(col)
            if expected is not None and not expected.equals(got):
                raise QueueError(
                    f"column {col!r} of partition {partition!r} has type {expected}, "
                    f"got {got}; a column keeps one type within a partition"
                )

    def new_sample_ids(self, count: int) -> np.ndarray:
        """Reserve ids for rows about to be added (the ids are never reused)."""
        ids = np.arange(self._next_sample_id, self._next_sample_id + count, dtype=np.int64)
        self._next_sample_id += count
        return ids

    def commit_add(
        self, partition: Hashable, ids: np.ndarray, types: dict[str, pa.DataType], meta: RowMeta
    ) -> None:
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = PartitionMeta(partition)
        positions = part.append_rows(ids)
        self._commit_columns(part, positions, types, None, meta)

    def check_put(
        self,
        partition: Hashable,
        sample_ids: np.ndarray,
        types: dict[str, pa.DataType],
    ) -> np.ndarray:
        """Validate a write of new columns to existing rows; return their positions."""
        part = self.partition(partition)
        positions = self._locate(part, sample_ids, f"put to partition {partition!r}")
        self.check_types(partition, types)
        for col in types:
            ready = part.ready.get(col)
            if ready is None:
                continue
            clash = ready[positions]
            if clash.any():
                by = sorted(part.producers.get(col, ()))
                written = f" (written by {', '.join(by)})" if by else ""
                raise QueueError(
                    f"column {col!r} is already stored{written} for sample ids "
                    f"{format_ids(sample_ids[clash])} of partition {partition!r}; "
                    "columns are write-once per row"
                )
        return positions

    def commit_put(
        self,
        partition: Hashable,
        positions: np.ndarray,
        types: dict[str, pa.DataType],
        producer: str | None,
        meta: RowMeta,
    ) -> None:
        self._commit_columns(self.partition(partition), positions, types, producer, meta)

    def _commit_columns(
        self,
        part: PartitionMeta,
        positions: np.ndarray,
        types: dict[str, pa.DataType],
        producer: str | None,
        meta: RowMeta,
    ) -> None:
        if meta.group_ids is not None:
            part.group_ids[positions] = meta.group_ids
            part.grouped[positions] = meta.grouped
        if meta.policy_versions is not None:
            part.policy_versions[positions] = meta.policy_versions
        if meta.lengths is not None:
            known = np.maximum(part.lengths[positions], 0)
            part.lengths[positions] = known + meta.lengths
        # Readiness last: from here on readers see the rows.
        for col, typ in types.items():
            part.types.setdefault(col, typ)
            ready = part.ready.get(col)
            if ready is None:
                ready = part.ready[col] = np.zeros(part.rows.capacity, dtype=bool)
                part.ready_count[col] = 0
            ready[positions] = True
            part.ready_count[col] += len(positions)
            if producer is not None:
                part.producers.setdefault(col, set()).add(producer)

    # ---- reads ------------------------------------------------------------------------

    def check_gather(
        self, partition: Hashable, columns: Sequence[str], sample_ids: np.ndarray | None
    ) -> np.ndarray:
        """Validate a read; return the sample ids to read, in output order."""
        part = self.partition(partition)
        missing = [c for c in columns if c not in part.types]
        if missing:
            raise QueueError(
                f"gather from partition {partition!r}: column(s) {missing} never written "
                f"(stored columns: {list(part.types)})"
            )
        if sample_ids is None:
            sample_ids = part.rows.ids.copy()
            positions = np.arange(part.n, dtype=np.int64)
        else:
            positions = self._locate(part, sample_ids, f"gather from partition {partition!r}")
        for col in columns:
            not_ready = ~part.ready[col][positions]
            if not_ready.any():
                raise QueueError(
                    f"gather from partition {partition!r}: column {col!r} is not ready for "
                    f"sample ids {format_ids(sample_ids[not_ready])}"
                )
        return sample_ids

    def ready_ids(self, partition: Hashable, columns: Sequence[str]) -> np.ndarray:
        part = self.partition(partition)
        return part.rows.ids[part.ready_mask(columns)].copy()

    def _available(self, part: PartitionMeta, task: str, columns: Sequence[str]) -> np.ndarray:
        """bool[n]: ready for `columns` and neither consumed nor leased by `task`."""
        mask = part.ready_mask(columns)
        state = part.taken.get(task)
        if state is not None:
            mask &= state[: part.n] == FREE
        return mask

    def pending(self, task: str, columns: Sequence[str], partition: Hashable) -> int:
        part = self.partition(partition)
        return int(np.count_nonzero(self._available(part, task, columns)))

    def candidates(
        self, task: str, columns: Sequence[str], partition: Hashable
    ) -> tuple[np.ndarray, Candidates]:
        """Rows `task` may take now (positions, sampler view), oldest first."""
        part = self.partition(partition)
        positions = np.flatnonzero(self._available(part, task, columns))
        grouped = part.grouped[positions]
        group_ids = part.group_ids[positions]
        sizes = np.ones(len(positions), dtype=np.int64)
        if grouped.any():
            sizes[grouped] = self._open_group_sizes(part, task, group_ids[grouped])
        cands = Candidates(
            sample_ids=part.rows.ids[positions],
            group_ids=group_ids,
            grouped=grouped,
            group_sizes=sizes,
            lengths=part.lengths[positions],
            policy_versions=part.policy_versions[positions],
        )
        return positions, cands

    @staticmethod
    def _open_group_sizes(part: PartitionMeta, task: str, wanted: np.ndarray) -> np.ndarray:
        """Rows per group still FREE for `task`, ready or not.

        Counting only rows the task has not taken keeps a group completable even if part of
        it was consumed earlier (e.g. by a sequential sampler); with group-preserving leases
        it equals the group's full size.
        """
        n = part.n
        free = part.grouped[:n].copy()
        state = part.taken.get(task)
        if state is not None:
            free &= state[:n] == FREE
        groups, counts = np.unique(part.group_ids[:n][free], return_counts=True)
        return counts[np.searchsorted(groups, wanted)]

    # ---- leases -----------------------------------------------------------------------

    def lease(
        self, task: str, partition: Hashable, positions: np.ndarray, sample_ids: np.ndarray
    ) -> int:
        part = self.partition(partition)
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        part.task_state(task)[positions] = LEASED
        part.leases.add(lease_id)
        self._leases[lease_id] = LeaseMeta(lease_id, task, partition, positions, sample_ids)
        return lease_id

    def ack(self, lease_id: int) -> LeaseMeta:
        return self._end_lease(lease_id, CONSUMED, "ack", "acked")

    def release(self, lease_id: int) -> LeaseMeta:
        return self._end_lease(lease_id, FREE, "release", "released")

    def _end_lease(self, lease_id: int, state: np.int8, verb: str, reason: str) -> LeaseMeta:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise QueueError(f"cannot {verb} lease {lease_id}: {self._why_gone(lease_id)}")
        part = self._partitions[lease.partition]
        part.taken[lease.task][lease.positions] = state
        part.leases.discard(lease_id)
        del self._leases[lease_id]
        self._retire(lease_id, f"it was already {reason}")
        return lease

    def _retire(self, lease_id: int, reason: str) -> None:
        self._retired[lease_id] = reason
        while len(self._retired) > _RETIRED_MEMORY:
            self._retired.popitem(last=False)

    def _why_gone(self, lease_id: int) -> str:
        if lease_id in self._retired:
            return self._retired[lease_id]
        if 0 <= lease_id < self._next_lease_id:
            return "it was acked, released or its partition cleared"
        return "it was never handed out"

    # ---- introspection ----------------------------------------------------------------

    def stats(self) -> dict:
        partitions = {
            name: {
                "rows": part.n,
                "ready": dict(part.ready_count),
                "leases_in_flight": len(part.leases),
            }
            for name, part in self._partitions.items()
        }
        return {
            "rows": sum(p.n for p in self._partitions.values()),
            "leases_in_flight": len(self._leases),
            "partitions": partitions,
        }

    # ---- helpers ----------------------------------------------------------------------

    @staticmethod
    def _locate(part: PartitionMeta, sample_ids: np.ndarray, context: str) -> np.ndarray:
        uniq, counts = np.unique(sample_ids, return_counts=True)
        if (counts > 1).any():
            raise QueueError(f"{context}: duplicate sample ids {format_ids(uniq[counts > 1])}")
        positions, found = part.rows.locate(sample_ids)
        if not found.all():
            raise QueueError(
                f"{context}: sample ids {format_ids(sample_ids[~found])} "
                "do not exist in that partition"
            )
        return positions
