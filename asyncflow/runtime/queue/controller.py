"""Queue metadata: which rows exist, which of their columns are ready, what each task took.

No Arrow data lives here, only plain dicts, sets and numpy arrays (plus the Arrow *types* of
the declared columns). That split lets the controller move into a Dask scheduler extension --
one hop from every worker and surviving worker deaths, like Dask's own Queue and Semaphore --
while the bytes stay with the storage on the workers that produced them.

So every scheduling decision is made here, and every method returns at once: who may take
which rows (readiness, staleness, sealing), leases with owners and deadlines (a dead worker
or a stuck consumer must not lose rows), capacity (backpressure on sources) and eviction (a
row every declared consumer acked is dead weight). Waiting is the caller's business: the
in-process facade waits on a threading.Condition, the extension on its event loop, and both
re-ask the controller when something changed.

Rows of a partition are addressed internally by *position* (insertion order). Sample ids are
global and strictly increasing, and a partition only ever appends, so a partition's id array
is sorted and id -> position is a binary search. Every per-row array below is indexed by
position and over-allocated (capacity doubling) so appending rows stays amortised O(rows).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from asyncflow.errors import QueueError
from asyncflow.runtime.queue import samplers
from asyncflow.runtime.queue.samplers import Candidates, Sampler

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


# Why a lease ended, for errors when its holder acts on it later.
_EXPIRED = "it expired: its deadline passed before it was acked, so its rows went back to the queue"
_EVICTED = "every declared consumer had acked them, or evict() dropped them"


@dataclass(frozen=True)
class LeaseMeta:
    lease_id: int
    task: str
    partition: Hashable
    positions: np.ndarray  # int64[k] positions in the partition
    sample_ids: np.ndarray  # int64[k] in the order handed out
    owner: str | None = None  # who holds it (e.g. a worker address), for release_owner()
    deadline: float | None = None  # monotonic seconds; expire(now) ends it once now >= this
    view: int | None = None  # same-view group: leases of one DP group sharing these rows


class PartitionMeta:
    """All metadata of one partition; arrays are int/bool[capacity], valid prefix [:rows.n]."""

    def __init__(self, name: Hashable, consumers: tuple[str, ...] | None = None) -> None:
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
        # bool[capacity]: the row's data is gone (consumed by every declared consumer)
        self.evicted = np.zeros(cap, dtype=bool)
        self.evicted_count = 0
        # lease ids currently outstanding on this partition
        self.leases: set[int] = set()
        # the source said no more rows will come
        self.sealed = False
        # tasks that must all ack a row before it is evicted; None = never evict
        self.consumers = consumers

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
            self.evicted = grown(self.evicted, cap, False)
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

    def state_of(self, task: str) -> np.ndarray:
        """int8[n] view of the task's row states (all FREE for a task never seen)."""
        state = self.taken.get(task)
        return np.zeros(self.n, dtype=np.int8) if state is None else state[: self.n]


class Controller:
    """Validates every request against the metadata, then records it; never blocks.

    `check_*` methods raise QueueError and change nothing; `commit_*` methods assume the
    matching check passed and the data is already stored, so a row becomes visible only once
    both data and metadata exist. `take`/`take_group` return None when the request cannot
    be served *now*; the caller decides whether to wait and ask again after a change.

    Rows this controller evicts are queued in `pop_evicted()` for whoever holds the data;
    time enters only as the `now` passed to `expire`, so the caller owns the clock.
    """

    def __init__(
        self, capacity_rows: int | None = None, consumers: Sequence[str] | None = None
    ) -> None:
        if capacity_rows is not None and (not _is_int(capacity_rows) or capacity_rows < 1):
            raise QueueError(f"capacity_rows must be an int >= 1 or None, got {capacity_rows!r}")
        # most live (not evicted) rows over all partitions; None = unbounded
        self.capacity_rows = None if capacity_rows is None else int(capacity_rows)
        # consumers every new partition starts with (declare_consumers overrides per partition)
        self._default_consumers = None if consumers is None else _task_names(consumers, "consumers")
        # partition key -> its metadata, in creation order
        self._partitions: dict[Hashable, PartitionMeta] = {}
        # lease id -> lease metadata, for leases handed out and not yet acked/released
        self._leases: dict[int, LeaseMeta] = {}
        # lease id -> why it ended ("acked", "released", ...), last _RETIRED_MEMORY only
        self._retired: OrderedDict[int, str] = OrderedDict()
        # owner -> ids of its outstanding leases
        self._by_owner: dict[str, set[int]] = {}
        # min-heap of (deadline, lease id); entries of leases already ended are skipped lazily
        self._deadlines: list[tuple[float, int]] = []
        # same-view group id -> its member leases not acked yet
        self._views: dict[int, set[int]] = {}
        # (partition, sample ids) evicted since the last pop_evicted()
        self._evicted: list[tuple[Hashable, np.ndarray]] = []
        self._live_rows = 0
        self._policy_version = 0
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
        for lease_id in sorted(meta.leases):
            lease = self._leases[lease_id]
            if lease.view is not None:
                self._views.pop(lease.view, None)
            self._drop_lease(lease, f"its partition {partition!r} was cleared")
        self._live_rows -= meta.n - meta.evicted_count
        self._evicted = [(p, ids) for p, ids in self._evicted if p != partition]
        del self._partitions[partition]

    def seal(self, partition: Hashable) -> None:
        """No more rows will be added: waits for `min_rows` can settle for what remains.

        Sealing twice is harmless (a restarted source may say it again).
        """
        self.partition(partition).sealed = True

    def declare_consumers(self, partition: Hashable, tasks: Sequence[str]) -> None:
        """Evict a row once every one of `tasks` acked it; creates the partition if needed.

        Declaring before any rows arrive is the normal use; rows that every task already
        acked are evicted at once.
        """
        consumers = _task_names(tasks, f"declare_consumers for partition {partition!r}")
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = PartitionMeta(partition)
        part.consumers = consumers
        self._evict_consumed(part, np.arange(part.n, dtype=np.int64))

    def is_drained(self, task: str, columns: Sequence[str], partition: Hashable) -> bool:
        """True once the partition is sealed and `task` consumed every row that is left.

        `columns` is accepted for symmetry with `take`/`pending`: a drained task has consumed
        every row whatever it reads. Rows evicted (e.g. dropped as stale) count as done.
        """
        part = self.partition(partition)
        if not part.sealed:
            return False
        live = ~part.evicted[: part.n]
        return bool(np.all(part.state_of(task)[live] == CONSUMED))

    def exhausted(self, task: str, partition: Hashable, max_staleness: int | None = None) -> bool:
        """Nothing can ever be handed to `task` again: sealed, nothing free, nothing leased.

        A waiting reader gives up on this rather than waiting out its timeout. Rows leased by
        `task` keep hope alive: they come back if released or expired.
        """
        part = self.partition(partition)
        if not part.sealed:
            return False
        if np.any(part.state_of(task) == LEASED):
            return False
        return self._open_rows(part, task, max_staleness) == 0

    # ---- policy versions --------------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def set_policy_version(self, version: int) -> None:
        """The trainer published `version`: rows generated long before it are stale."""
        if not _is_int(version) or version < 0:
            raise QueueError(f"set_policy_version: version must be an int >= 0, got {version!r}")
        if version < self._policy_version:
            raise QueueError(
                f"set_policy_version: policy versions only go forward; current is "
                f"{self._policy_version}, got {version}"
            )
        self._policy_version = int(version)

    def stale(self, partition: Hashable, max_staleness: int) -> np.ndarray:
        """Ids of live rows generated more than `max_staleness` versions ago, in id order.

        Rows without a policy version are never stale. The caller decides what to do with
        them: `evict` to drop them, or regenerate and add new rows.
        """
        _check_staleness(f"stale in partition {partition!r}", max_staleness, optional=False)
        part = self.partition(partition)
        n = part.n
        versions = part.policy_versions[:n]
        old = versions >= 0
        old &= versions < self._policy_version - max_staleness
        old &= ~part.evicted[:n]
        return part.rows.ids[:n][old].copy()

    # ---- capacity ---------------------------------------------------------------------

    def live_rows(self) -> int:
        """Rows held over all partitions, not counting evicted ones: what capacity bounds."""
        return self._live_rows

    def room_for(self, num_rows: int) -> bool:
        cap = self.capacity_rows
        return cap is None or num_rows == 0 or self._live_rows + num_rows <= cap

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

    def check_add(self, partition: Hashable, types: dict[str, pa.DataType], num_rows: int) -> None:
        """Everything that makes an add_rows wrong whatever the queue's fill (not room)."""
        context = f"add_rows to partition {partition!r}"
        meta = self._partitions.get(partition)
        if meta is not None and meta.sealed:
            raise QueueError(f"{context}: the partition is sealed, no more rows may be added")
        cap = self.capacity_rows
        if cap is not None and num_rows > cap:
            raise QueueError(
                f"{context}: {num_rows} rows can never fit, the queue's capacity_rows is {cap}; "
                "add them in smaller batches"
            )
        self.check_types(partition, types)

    @property
    def next_sample_id(self) -> int:
        return self._next_sample_id

    def start_ids_at(self, next_id: int) -> None:
        if next_id < self._next_sample_id:
            raise QueueError(f"sample ids cannot go back from {self._next_sample_id} to {next_id}")
        self._next_sample_id = int(next_id)

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
            part = self._partitions[partition] = PartitionMeta(partition, self._default_consumers)
        positions = part.append_rows(ids)
        self._live_rows += len(ids)
        self._commit_columns(part, positions, types, None, meta)

    def check_put(
        self,
        partition: Hashable,
        sample_ids: np.ndarray,
        types: dict[str, pa.DataType],
    ) -> np.ndarray:
        """Validate a write of new columns to existing rows; return their positions."""
        part = self.partition(partition)
        context = f"put to partition {partition!r}"
        positions = self._locate(part, sample_ids, context)
        self._check_not_evicted(part, positions, sample_ids, context)
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
        """Validate a read; return the sample ids to read, in output order.

        Without ids, every live row: evicted rows have no data left to read.
        """
        part = self.partition(partition)
        context = f"gather from partition {partition!r}"
        missing = [c for c in columns if c not in part.types]
        if missing:
            raise QueueError(
                f"{context}: column(s) {missing} never written (stored columns: {list(part.types)})"
            )
        if sample_ids is None:
            positions = np.flatnonzero(~part.evicted[: part.n])
            sample_ids = part.rows.ids[positions].copy()
        else:
            positions = self._locate(part, sample_ids, context)
            self._check_not_evicted(part, positions, sample_ids, context)
        for col in columns:
            not_ready = ~part.ready[col][positions]
            if not_ready.any():
                raise QueueError(
                    f"{context}: column {col!r} is not ready for "
                    f"sample ids {format_ids(sample_ids[not_ready])}"
                )
        return sample_ids

    def ready_ids(self, partition: Hashable, columns: Sequence[str]) -> np.ndarray:
        part = self.partition(partition)
        mask = part.ready_mask(columns) & ~part.evicted[: part.n]
        return part.rows.ids[mask].copy()

    def _fresh(self, part: PartitionMeta, max_staleness: int | None) -> np.ndarray:
        """bool[n]: rows recent enough; a row without a policy version is always fresh."""
        versions = part.policy_versions[: part.n]
        if max_staleness is None:
            return np.ones(part.n, dtype=bool)
        return (versions < 0) | (versions >= self._policy_version - max_staleness)

    def _available(
        self,
        part: PartitionMeta,
        task: str,
        columns: Sequence[str],
        max_staleness: int | None = None,
    ) -> np.ndarray:
        """bool[n]: ready for `columns`, live, fresh, neither consumed nor leased by `task`."""
        mask = part.ready_mask(columns)
        mask &= ~part.evicted[: part.n]
        mask &= part.state_of(task) == FREE
        if max_staleness is not None:
            mask &= self._fresh(part, max_staleness)
        return mask

    def _open_rows(self, part: PartitionMeta, task: str, max_staleness: int | None) -> int:
        """Rows `task` may still be handed, ready or not (live, fresh, FREE for it)."""
        mask = part.state_of(task) == FREE
        mask &= ~part.evicted[: part.n]
        if max_staleness is not None:
            mask &= self._fresh(part, max_staleness)
        return int(np.count_nonzero(mask))

    def pending(self, task: str, columns: Sequence[str], partition: Hashable) -> int:
        part = self.partition(partition)
        return int(np.count_nonzero(self._available(part, task, columns)))

    def candidates(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        max_staleness: int | None = None,
    ) -> tuple[np.ndarray, Candidates]:
        """Rows `task` may take now (positions, sampler view), oldest first."""
        part = self.partition(partition)
        positions = np.flatnonzero(self._available(part, task, columns, max_staleness))
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
        """Rows per group still FREE for `task` and live, ready or not.

        Counting only rows the task has not taken keeps a group completable even if part of
        it was consumed earlier (e.g. by a sequential sampler); with group-preserving leases
        it equals the group's full size.
        """
        n = part.n
        free = part.grouped[:n] & ~part.evicted[:n]
        free &= part.state_of(task) == FREE
        groups, counts = np.unique(part.group_ids[:n][free], return_counts=True)
        return counts[np.searchsorted(groups, wanted)]

    # ---- taking rows ------------------------------------------------------------------

    def take(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        *,
        batch_size: int | None = None,
        sampler: Sampler = samplers.sequential,
        min_rows: int = 1,
        max_staleness: int | None = None,
        owner: str | None = None,
        deadline: float | None = None,
    ) -> LeaseMeta | None:
        """Run the sampler over what `task` may take and lease its choice, if it is enough.

        Enough means at least `min_rows` rows, or, once the partition is sealed and every
        row the task could still get is on offer, whatever the sampler picks: waiting for
        more would be waiting for rows that will never come. None = nothing to hand out now.
        """
        context = f"get for task {task!r}"
        _check_take(context, task, batch_size, min_rows, max_staleness, owner, deadline)
        found = self._choose(task, columns, partition, batch_size, sampler, max_staleness)
        if found is None:
            return None
        part, positions, chosen, final = found
        if len(chosen) < min_rows and not final:
            return None
        ids = chosen.sample_ids
        lease_id = self._new_lease(task, part, positions, ids, owner, deadline, None)
        return self._leases[lease_id]

    def take_group(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        *,
        ranks: int,
        batch_size: int | None = None,
        sampler: Sampler = samplers.sequential,
        balance: str | None = "karmarkar_karp",
        same_view: bool = False,
        min_rows: int = 1,
        max_staleness: int | None = None,
        owner: str | None = None,
        deadline: float | None = None,
    ) -> list[LeaseMeta] | None:
        """One sampler choice for a data-parallel group of `ranks`, as one lease per rank.

        `same_view=False` splits the rows between ranks, balanced by tokens (see
        `samplers.split_for_ranks`); the group waits (returns None) until every rank can get
        at least one row (one group with group-preserving samplers), except once the
        partition is sealed and fewer remain: then fewer, never empty, leases. `batch_size`
        and `min_rows` count the rows of the whole group.

        `same_view=True` gives every rank a lease on the same rows (ranks that must all see
        one micro-batch). The rows are consumed only when every one of those leases is
        acked; releasing (or expiry, or loss of the owner of) any one gives the rows back
        and ends the others.
        """
        context = f"get_group for task {task!r}"
        _check_take(context, task, batch_size, min_rows, max_staleness, owner, deadline)
        if not _is_int(ranks) or ranks < 1:
            raise QueueError(f"{context}: ranks must be an int >= 1, got {ranks!r}")
        if balance is not None and balance not in samplers.BALANCE_METHODS:
            known = list(samplers.BALANCE_METHODS)
            raise QueueError(
                f"{context}: unknown balance method {balance!r} (known: {known} or None)"
            )
        if not isinstance(same_view, bool):
            raise QueueError(f"{context}: same_view must be a bool, got {same_view!r}")
        found = self._choose(task, columns, partition, batch_size, sampler, max_staleness)
        if found is None:
            return None
        part, positions, chosen, final = found
        if same_view:
            if len(chosen) < min_rows and not final:
                return None
            view = self._next_lease_id
            ids = [
                self._new_lease(task, part, positions, chosen.sample_ids, owner, deadline, view)
                for _ in range(int(ranks))
            ]
            self._views[view] = set(ids)
            return [self._leases[i] for i in ids]
        whole_groups = samplers.keeps_groups(sampler)
        shares = samplers.split_for_ranks(chosen, int(ranks), balance, whole_groups)
        if (len(chosen) < min_rows or len(shares) < ranks) and not final:
            return None
        by_id = np.argsort(chosen.sample_ids, kind="stable")
        sorted_ids = chosen.sample_ids[by_id]
        leases = []
        for share in shares:
            where = by_id[np.searchsorted(sorted_ids, share)]
            lease_id = self._new_lease(task, part, positions[where], share, owner, deadline, None)
            leases.append(self._leases[lease_id])
        return leases

    def _choose(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        batch_size: int | None,
        sampler: Sampler,
        max_staleness: int | None,
    ) -> tuple[PartitionMeta, np.ndarray, Candidates, bool] | None:
        """(partition, positions, chosen rows, final) or None if the sampler picks nothing.

        `final`: sealed, and every row the task could still be handed is a candidate now.
        """
        part = self.partition(partition)
        positions, cands = self.candidates(task, columns, partition, max_staleness)
        if len(cands) == 0:
            return None
        chosen = checked_choice(sampler, cands, batch_size)
        if len(chosen) == 0:
            return None
        index = np.searchsorted(cands.sample_ids, chosen)
        final = part.sealed and self._open_rows(part, task, max_staleness) == len(cands)
        return part, positions[index], cands.subset(index), final

    # ---- leases -----------------------------------------------------------------------

    def lease(
        self,
        task: str,
        partition: Hashable,
        positions: np.ndarray,
        sample_ids: np.ndarray,
        *,
        owner: str | None = None,
        deadline: float | None = None,
    ) -> int:
        """Lease exactly these rows (the caller chose them); prefer `take`, which checks."""
        part = self.partition(partition)
        return self._new_lease(task, part, positions, sample_ids, owner, deadline, None)

    def _new_lease(
        self,
        task: str,
        part: PartitionMeta,
        positions: np.ndarray,
        sample_ids: np.ndarray,
        owner: str | None,
        deadline: float | None,
        view: int | None,
    ) -> int:
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        part.task_state(task)[positions] = LEASED
        part.leases.add(lease_id)
        self._leases[lease_id] = LeaseMeta(
            lease_id, task, part.name, positions, sample_ids, owner, deadline, view
        )
        if owner is not None:
            self._by_owner.setdefault(owner, set()).add(lease_id)
        if deadline is not None:
            heapq.heappush(self._deadlines, (float(deadline), lease_id))
        return lease_id

    def ack(self, lease_id: int) -> LeaseMeta:
        """The lease's task is done with its rows; evicts those every consumer is done with."""
        lease = self._active(lease_id, "ack")
        self._drop_lease(lease, "it was already acked")
        if lease.view is not None:
            unacked = self._views[lease.view]
            unacked.discard(lease_id)
            if unacked:  # the rows stay leased until every rank of the view acked
                return lease
            del self._views[lease.view]
        part = self._partitions[lease.partition]
        part.taken[lease.task][lease.positions] = CONSUMED
        self._evict_consumed(part, lease.positions)
        return lease

    def release(self, lease_id: int) -> LeaseMeta:
        """Give the rows back to the lease's task (and end its same-view siblings)."""
        lease = self._active(lease_id, "release")
        self._give_back(
            lease,
            "it was already released",
            f"it was released with lease {lease_id} of its same-view group",
        )
        return lease

    def expire(self, now: float) -> list[int]:
        """End every lease whose deadline is <= `now`; return their ids (siblings included).

        Their rows go back to their tasks: a consumer that hung or crashed silently cannot
        hold rows forever. Late acks of these leases raise, saying they expired.
        """
        ended: list[int] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, lease_id = heapq.heappop(self._deadlines)
            lease = self._leases.get(lease_id)
            if lease is not None:  # else acked, released or cleared before its deadline
                ended += self._give_back(lease, _EXPIRED, _EXPIRED)
        return ended

    def release_owner(self, owner: str) -> list[int]:
        """End every lease `owner` holds (it died); return their ids. Unknown owner: []."""
        why = f"it was released because its owner {owner!r} was lost"
        ended: list[int] = []
        for lease_id in sorted(self._by_owner.get(owner, ())):
            lease = self._leases.get(lease_id)
            if lease is not None:  # a same-view sibling may have ended it already
                ended += self._give_back(lease, why, why)
        return ended

    def next_deadline(self) -> float | None:
        """The earliest deadline of a lease still out: when a waiter should sweep next."""
        while self._deadlines and self._deadlines[0][1] not in self._leases:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def _give_back(self, lease: LeaseMeta, reason: str, sibling_reason: str) -> list[int]:
        ended = [lease.lease_id]
        self._drop_lease(lease, reason)
        if lease.view is not None:
            for other in sorted(self._views.pop(lease.view, set()) - {lease.lease_id}):
                self._drop_lease(self._leases[other], sibling_reason)
                ended.append(other)
        part = self._partitions[lease.partition]
        part.taken[lease.task][lease.positions] = FREE
        return ended

    def _active(self, lease_id: int, verb: str) -> LeaseMeta:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise QueueError(f"cannot {verb} lease {lease_id}: {self._why_gone(lease_id)}")
        return lease

    def _drop_lease(self, lease: LeaseMeta, reason: str) -> None:
        """Forget an outstanding lease (not its rows' state) and remember why it ended."""
        del self._leases[lease.lease_id]
        self._partitions[lease.partition].leases.discard(lease.lease_id)
        if lease.owner is not None:
            held = self._by_owner.get(lease.owner)
            if held is not None:
                held.discard(lease.lease_id)
                if not held:
                    del self._by_owner[lease.owner]
        self._retire(lease.lease_id, reason)

    def _retire(self, lease_id: int, reason: str) -> None:
        self._retired[lease_id] = reason
        while len(self._retired) > _RETIRED_MEMORY:
            self._retired.popitem(last=False)

    def _why_gone(self, lease_id: int) -> str:
        if lease_id in self._retired:
            return self._retired[lease_id]
        if 0 <= lease_id < self._next_lease_id:
            return "it was acked, released, expired or its partition cleared"
        return "it was never handed out"

    # ---- eviction ---------------------------------------------------------------------

    def evict(self, partition: Hashable, sample_ids: np.ndarray) -> None:
        """Drop rows now, for every task (e.g. stale ones); they must not be leased."""
        context = f"evict from partition {partition!r}"
        part = self.partition(partition)
        positions = self._locate(part, sample_ids, context)
        gone = part.evicted[positions]
        if gone.any():
            raise QueueError(
                f"{context}: sample ids {format_ids(sample_ids[gone])} were already evicted"
            )
        for task, state in part.taken.items():
            held = state[positions] == LEASED
            if held.any():
                raise QueueError(
                    f"{context}: sample ids {format_ids(sample_ids[held])} are leased by task "
                    f"{task!r}; ack or release them first"
                )
        self._evict(part, positions)

    def lose(self, partition: Hashable, positions: np.ndarray) -> None:
        """Rows whose data is gone (its holder died): evicted for every task, leased or not."""
        part = self.partition(partition)
        positions = np.asarray(positions, dtype=np.int64)
        self._evict(part, positions[~part.evicted[positions]])

    def pop_evicted(self) -> list[tuple[Hashable, np.ndarray]]:
        """(partition, sample ids) evicted since the last call: the data holder drops them."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _evict_consumed(self, part: PartitionMeta, positions: np.ndarray) -> None:
        if part.consumers is None or len(positions) == 0:
            return
        done = ~part.evicted[positions]
        for task in part.consumers:
            done &= part.state_of(task)[positions] == CONSUMED
        self._evict(part, positions[done])

    def _evict(self, part: PartitionMeta, positions: np.ndarray) -> None:
        if len(positions) == 0:
            return
        part.evicted[positions] = True
        part.evicted_count += len(positions)
        self._live_rows -= len(positions)
        self._evicted.append((part.name, part.rows.ids[positions].copy()))

    @staticmethod
    def _check_not_evicted(
        part: PartitionMeta, positions: np.ndarray, sample_ids: np.ndarray, context: str
    ) -> None:
        gone = part.evicted[positions]
        if gone.any():
            raise QueueError(
                f"{context}: sample ids {format_ids(sample_ids[gone])} were evicted "
                f"({_EVICTED}); their data is gone"
            )

    # ---- introspection ----------------------------------------------------------------

    def stats(self) -> dict:
        """Counters only: O(partitions x columns + leases), never a scan over rows."""
        partitions = {
            name: {
                "rows": part.n,
                "live_rows": part.n - part.evicted_count,
                "evicted": part.evicted_count,
                "ready": dict(part.ready_count),
                "leases_in_flight": len(part.leases),
                "sealed": part.sealed,
                "consumers": None if part.consumers is None else list(part.consumers),
            }
            for name, part in self._partitions.items()
        }
        by_task: dict[str, int] = {}
        for lease in self._leases.values():
            by_task[lease.task] = by_task.get(lease.task, 0) + 1
        return {
            "rows": sum(p.n for p in self._partitions.values()),
            "live_rows": self._live_rows,
            "evicted_rows": sum(p.evicted_count for p in self._partitions.values()),
            "capacity_rows": self.capacity_rows,
            "policy_version": self._policy_version,
            "leases_in_flight": len(self._leases),
            "leases_by_task": dict(sorted(by_task.items())),
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


def checked_choice(sampler: Sampler, cands: Candidates, batch_size: int | None) -> np.ndarray:
    """Run the sampler and make sure it only picked offered rows, each once."""
    chosen = np.asarray(sampler(cands, batch_size))
    if chosen.size == 0:
        return np.empty(0, dtype=np.int64)
    name = getattr(sampler, "__name__", repr(sampler))
    if chosen.ndim != 1 or not np.issubdtype(chosen.dtype, np.integer):
        raise QueueError(f"sampler {name} must return a flat array of sample ids")
    chosen = chosen.astype(np.int64, copy=False)
    offered = np.isin(chosen, cands.sample_ids)
    if not offered.all():
        raise QueueError(f"sampler {name} picked rows not offered: {format_ids(chosen[~offered])}")
    if len(np.unique(chosen)) != len(chosen):
        raise QueueError(f"sampler {name} picked some sample ids more than once")
    return chosen


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _task_names(tasks: Sequence[str], context: str) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise QueueError(f"{context}: tasks must be a list of task names, got the str {tasks!r}")
    names = tuple(dict.fromkeys(tasks))
    bad = [t for t in names if not isinstance(t, str)]
    if bad:
        raise QueueError(f"{context}: task names must be str, got {bad}")
    if not names:
        raise QueueError(f"{context}: at least one consumer task is needed to evict rows")
    return names


def _check_staleness(context: str, max_staleness: object, optional: bool = True) -> None:
    if max_staleness is None and optional:
        return
    if not _is_int(max_staleness) or max_staleness < 0:
        raise QueueError(f"{context}: max_staleness must be an int >= 0, got {max_staleness!r}")


def _check_take(
    context: str,
    task: object,
    batch_size: object,
    min_rows: object,
    max_staleness: object,
    owner: object,
    deadline: object,
) -> None:
    """Arguments of take/take_group, checked before anything is looked at."""
    if not isinstance(task, str):
        raise QueueError(f"{context}: task must be a str naming the consumer, got {task!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise QueueError(f"{context}: batch_size must be >= 1, got {batch_size}")
    if not _is_int(min_rows) or min_rows < 1:
        raise QueueError(f"{context}: min_rows must be an int >= 1, got {min_rows!r}")
    if batch_size is not None and min_rows > batch_size:
        raise QueueError(
            f"{context}: min_rows {min_rows} > batch_size {batch_size}, such a batch can never "
            "be handed out"
        )
    _check_staleness(context, max_staleness)
    if owner is not None and not isinstance(owner, str):
        raise QueueError(f"{context}: owner must be a str (e.g. a worker address), got {owner!r}")
    if deadline is not None and (
        not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or math.isnan(deadline)
    ):
        raise QueueError(f"{context}: deadline must be a number of seconds, got {deadline!r}")
