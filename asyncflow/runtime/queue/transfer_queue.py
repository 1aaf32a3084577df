"""TransferQueue: the buffer every operator reads ready rows from and writes new columns to.

The facade owns the order of operations that makes writes safe: validate everything (shape,
types, ids, write-once) against the controller, then store the data, then mark the rows
ready. A reader can therefore never see a column whose data is not there, and a rejected
write leaves nothing behind. One lock serialises the facade, because the executor calls it
from several threads; Arrow arrays are immutable, so building a lease's batch happens
outside it.

Every decision (who gets which rows, when a lease is void, when a row is dead weight) is
the controller's; what the facade adds is *waiting*. A reader blocked on `get(timeout=...)`
or a source blocked on a full queue sleeps on one `threading.Condition` that every change
notifies, so it wakes when its answer may have changed instead of polling, and releases the
lock while it sleeps, so waiters never hold each other up. Lease deadlines are swept lazily
at the start of every call (and when a waiter's next deadline comes due): an expired lease
needs no timer thread, only the next visit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asyncflow.errors import QueueError
from asyncflow.runtime.queue import samplers
from asyncflow.runtime.queue.controller import Controller, LeaseMeta, RowMeta, format_ids
from asyncflow.runtime.queue.samplers import Sampler
from asyncflow.runtime.queue.storage import EvictingStorage

SAMPLE_ID = "sample_id"
GROUP_ID = "group_id"
POLICY_VERSION = "policy_version"
DEFAULT_LENGTH_COLUMNS = ("prompt_ids", "response_ids")

T = TypeVar("T")


class QueueFull(QueueError):
    """A source waited longer than its timeout for room: the consumers are falling behind.

    Kept apart from other QueueErrors because it is about load, not bad input: the caller
    may retry, slow down or grow the queue. Carries its numbers for that decision.
    """

    def __init__(self, message: str, capacity_rows: int, live_rows: int, requested: int):
        self.capacity_rows = capacity_rows
        self.live_rows = live_rows
        self.requested = requested
        super().__init__(message)

    def __reduce__(self):  # errors cross process boundaries (Dask): rebuild from our fields
        return (type(self), (str(self), self.capacity_rows, self.live_rows, self.requested))


@dataclass(frozen=True, eq=False)
class Lease:
    """A micro-batch handed to one task; ack it once its outputs are stored, else release.

    A lease with a `deadline` (the queue's clock, monotonic seconds) that is neither acked
    nor released by then is expired: its rows go to the next reader and a late ack fails.
    """

    lease_id: int
    task: str
    partition: Hashable
    sample_ids: np.ndarray  # int64[k], row order of `batch`
    batch: pa.RecordBatch  # `sample_id` then the requested columns
    owner: str | None = None
    deadline: float | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)


class TransferQueue:
    """Arrow-native, column-oriented sample buffer with per-task consumption and leases.

    `length_columns` are the list columns whose lengths add up to a row's token count,
    which samplers see as `Candidates.lengths` (e.g. for token-balanced batches).

    `capacity_rows` bounds the live rows over all partitions: `add_rows` waits for room, so
    a fast source cannot run ahead of its consumers without bound. Room is made by
    eviction: with `consumers` (or `declare_consumers` per partition) a row is dropped once
    every one of those tasks acked it; without them rows stay until `clear`.

    `clock` gives lease deadlines (monotonic seconds); tests pass a fake one to expire
    leases without sleeping. Waiting itself always uses real time.
    """

    def __init__(
        self,
        length_columns: Sequence[str] = DEFAULT_LENGTH_COLUMNS,
        *,
        capacity_rows: int | None = None,
        consumers: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._controller = Controller(capacity_rows=capacity_rows, consumers=consumers)
        self._storage = EvictingStorage()
        self._length_columns = tuple(length_columns)
        self._clock = clock
        self._lock = threading.Lock()
        # notified on every change that could let a waiter proceed
        self._changed = threading.Condition(self._lock)

    # ---- writes -----------------------------------------------------------------------

    @property
    def next_sample_id(self) -> int:
        """The id the next added row gets: part of a checkpoint's queue position."""
        with self._lock:
            return self._controller.next_sample_id

    def start_ids_at(self, next_id: int) -> None:
        """Resume numbering where a checkpointed run stopped (never backwards)."""
        with self._lock:
            self._controller.start_ids_at(next_id)

    def add_rows(
        self,
        partition: Hashable,
        batch: pa.RecordBatch | pa.Table,
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Append new rows (creating the partition if needed); return their new sample ids.

        Ids come from one global counter so they are unique across partitions and a
        partition's rows are always in id order. An empty batch still creates the partition
        and declares its columns' types.

        With a capacity, waits while the new rows would not fit (None = as long as it
        takes, 0 = not at all) and raises QueueFull when `timeout` passes. A batch larger
        than the capacity, or rows for a sealed partition, are refused at once.
        """
        context = f"add_rows to partition {partition!r}"
        _check_wait(context, "timeout", timeout)
        batch = _as_batch(batch, context)
        if SAMPLE_ID in batch.schema.names:
            raise QueueError(
                f"{context}: the batch has a {SAMPLE_ID!r} column; sample ids are assigned by "
                "the queue, drop that column"
            )
        types = _column_types(batch, context)
        meta = _row_meta(batch, self._length_columns, context)
        count = batch.num_rows

        def fits() -> bool | None:
            self._controller.check_add(partition, types, count)  # may change while waiting
            return True if self._controller.room_for(count) else None

        with self._changed:
            self._sweep()
            if self._wait_until(fits, timeout) is None:
                cap = self._controller.capacity_rows
                live = self._controller.live_rows()
                raise QueueFull(
                    f"{context}: queue full, {live} live rows + {count} new would exceed "
                    f"capacity_rows {cap} (waited {timeout}s); rows are freed when every "
                    "declared consumer has acked them, or by clear()",
                    capacity_rows=cap or 0,
                    live_rows=live,
                    requested=count,
                )
            ids = self._controller.new_sample_ids(count)
            self._storage.add_rows(partition, ids)
            self._storage.store(partition, ids, batch)
            self._controller.commit_add(partition, ids, types, meta)
            self._changed.notify_all()
        return ids.copy()

    def put(
        self,
        partition: Hashable,
        sample_ids: Sequence[int] | np.ndarray,
        batch: pa.RecordBatch | pa.Table,
        *,
        producer: str | None = None,
    ) -> None:
        """Write new columns for existing rows; they become ready together, or not at all.

        A `sample_id` column in `batch` (an operator echoing its input) is accepted if it
        equals `sample_ids`, and is not stored.
        """
        context = f"put to partition {partition!r}" + (f" by {producer!r}" if producer else "")
        batch = _as_batch(batch, context)
        ids = _as_ids(sample_ids, context)
        if batch.num_rows != len(ids):
            raise QueueError(
                f"{context}: batch has {batch.num_rows} rows but {len(ids)} sample ids were "
                f"given {format_ids(ids)}"
            )
        batch = _without_echoed_ids(batch, ids, context)
        types = _column_types(batch, context)
        meta = _row_meta(batch, self._length_columns, context)
        with self._changed:
            self._sweep()
            positions = self._controller.check_put(partition, ids, types)
            self._storage.store(partition, ids, batch)
            self._controller.commit_put(partition, positions, types, producer, meta)
            self._changed.notify_all()

    def seal(self, partition: Hashable) -> None:
        """The source is done: no more rows for this partition (add_rows now fails).

        Readers then stop waiting for a `min_rows` that can no longer be reached and take
        the remainder; `is_drained` can become True.
        """
        with self._changed:
            self._sweep()
            self._controller.seal(partition)
            self._changed.notify_all()

    # ---- consumption ------------------------------------------------------------------

    def get(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        *,
        batch_size: int | None = None,
        sampler: Sampler = samplers.sequential,
        owner: str | None = None,
        lease_timeout: float | None = None,
        timeout: float | None = 0.0,
        min_rows: int = 1,
        max_staleness: int | None = None,
    ) -> Lease | None:
        """Lease up to `batch_size` rows ready for `columns` that `task` has not taken yet.

        Returns None when nothing (or nothing the sampler accepts, e.g. no complete group)
        is available. A column never written to the partition is simply not ready.

        - `timeout`: 0 answers now; > 0 waits up to that many seconds for the sampler to
          offer at least `min_rows` rows; None waits as long as it takes. Once the
          partition is sealed and every row the task could still get is on offer, the
          remainder is enough; once nothing can ever come (`exhausted`), None comes at once.
        - `owner` / `lease_timeout`: who holds the lease (see `release_owner`) and how many
          seconds it may stay out before its rows are handed out again.
        - `max_staleness`: only rows whose `policy_version` is at least the current policy
          version minus this are offered (rows without a version always are).
        """
        context = f"get for task {task!r}"
        cols = _requested_columns(columns, context)
        _check_wait(context, "timeout", timeout)
        _check_lease_timeout(context, lease_timeout)

        def take() -> LeaseMeta | None:
            return self._controller.take(
                task,
                cols,
                partition,
                batch_size=batch_size,
                sampler=sampler,
                min_rows=min_rows,
                max_staleness=max_staleness,
                owner=owner,
                deadline=self._deadline(lease_timeout),
            )

        with self._changed:
            self._sweep()
            meta = self._wait_until(take, timeout, self._hopeless(task, partition, max_staleness))
            if meta is None:
                return None
            table = self._storage.read(partition, meta.sample_ids, cols)
        try:
            batch = _to_batch(table)
        except BaseException:
            self.release(meta.lease_id)
            raise
        return _lease(meta, batch)

    def get_group(
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
        owner: str | None = None,
        lease_timeout: float | None = None,
        timeout: float | None = 0.0,
        min_rows: int = 1,
        max_staleness: int | None = None,
    ) -> list[Lease] | None:
        """One sampler choice for a data-parallel group, as one lease per rank.

        Data-parallel ranks step together, so the slowest rank sets the pace: the rows are
        split between ranks with equal token sums (`balance`: "karmarkar_karp",
        "longest_first", or None for contiguous runs of equal row counts), whole groups kept
        together when the sampler keeps groups. It waits like `get` until every rank can get
        at least one row (or group); once the partition is sealed and fewer remain it
        returns fewer leases - never an empty one. `batch_size` and `min_rows` count the
        rows of the whole group.

        `same_view=True` instead gives all `ranks` leases the same rows (ranks that must see
        one micro-batch, e.g. tensor-parallel peers): the rows are consumed once every one
        of those leases is acked, and releasing any one gives them back and ends the rest.
        """
        context = f"get_group for task {task!r}"
        cols = _requested_columns(columns, context)
        _check_wait(context, "timeout", timeout)
        _check_lease_timeout(context, lease_timeout)

        def take() -> list[LeaseMeta] | None:
            return self._controller.take_group(
                task,
                cols,
                partition,
                ranks=ranks,
                batch_size=batch_size,
                sampler=sampler,
                balance=balance,
                same_view=same_view,
                min_rows=min_rows,
                max_staleness=max_staleness,
                owner=owner,
                deadline=self._deadline(lease_timeout),
            )

        with self._changed:
            self._sweep()
            metas = self._wait_until(take, timeout, self._hopeless(task, partition, max_staleness))
            if metas is None:
                return None
            if same_view:
                tables = [self._storage.read(partition, metas[0].sample_ids, cols)]
            else:
                tables = [self._storage.read(partition, m.sample_ids, cols) for m in metas]
        try:
            batches = [_to_batch(table) for table in tables]
        except BaseException:
            self.release(metas[0].lease_id)  # ends its same-view siblings too
            for meta in metas[1:] if not same_view else ():
                self.release(meta.lease_id)
            raise
        if same_view:
            batches = batches * len(metas)
        return [_lease(meta, batch) for meta, batch in zip(metas, batches, strict=True)]

    def ack(self, lease: Lease | int) -> None:
        """The lease's outputs are stored: its rows are consumed by its task for good.

        Rows every declared consumer has now acked are evicted, freeing room.
        """
        with self._changed:
            self._sweep()
            self._controller.ack(_lease_id(lease))
            self._drop_evicted()
            self._changed.notify_all()

    def release(self, lease: Lease | int) -> None:
        """The consumer failed: hand the lease's rows to its task again later."""
        with self._changed:
            self._sweep()
            self._controller.release(_lease_id(lease))
            self._changed.notify_all()

    def release_owner(self, owner: str) -> list[int]:
        """`owner` (e.g. a worker) is gone: hand back every lease it held; return their ids."""
        if not isinstance(owner, str):
            raise QueueError(f"release_owner: owner must be a str, got {owner!r}")
        with self._changed:
            self._sweep()
            ended = self._controller.release_owner(owner)
            if ended:
                self._changed.notify_all()
            return ended

    def expire(self) -> list[int]:
        """Sweep lease deadlines now; return the ids of leases that expired.

        Every call sweeps anyway; this is for a caller that wants to know which.
        """
        with self._changed:
            ended = self._controller.expire(self._clock())
            if ended:
                self._changed.notify_all()
            return ended

    def is_drained(self, task: str, columns: Sequence[str], partition: Hashable) -> bool:
        """Sealed, and `task` consumed every row that is left: its work here is done."""
        cols = _requested_columns(columns, f"is_drained for task {task!r}")
        with self._changed:
            self._sweep()
            return self._controller.is_drained(task, cols, partition)

    # ---- policy versions and staleness -------------------------------------------------

    @property
    def policy_version(self) -> int:
        with self._changed:
            return self._controller.policy_version

    def set_policy_version(self, version: int) -> None:
        """The trainer's weights are now at `version` (only ever forward)."""
        with self._changed:
            self._sweep()
            self._controller.set_policy_version(version)
            self._changed.notify_all()

    def stale(self, partition: Hashable, max_staleness: int) -> np.ndarray:
        """Ids of live rows more than `max_staleness` policy versions old, to drop or redo."""
        with self._changed:
            self._sweep()
            return self._controller.stale(partition, max_staleness)

    # ---- eviction ---------------------------------------------------------------------

    def declare_consumers(self, partition: Hashable, tasks: Sequence[str]) -> None:
        """Evict each row of `partition` once all of `tasks` acked it (creates the partition).

        Overrides the queue-wide `consumers` for this partition.
        """
        with self._changed:
            self._sweep()
            self._controller.declare_consumers(partition, tasks)
            self._drop_evicted()
            self._changed.notify_all()

    def evict(self, partition: Hashable, sample_ids: Sequence[int] | np.ndarray) -> None:
        """Drop rows for every task now (e.g. the `stale` ones); none may be leased."""
        context = f"evict from partition {partition!r}"
        ids = _as_ids(sample_ids, context)
        with self._changed:
            self._sweep()
            self._controller.evict(partition, ids)
            self._drop_evicted()
            self._changed.notify_all()

    def live_rows(self) -> int:
        """Rows held over all partitions, evicted ones not counted (what capacity bounds)."""
        with self._changed:
            self._sweep()
            return self._controller.live_rows()

    # ---- reads ------------------------------------------------------------------------

    def gather(
        self,
        partition: Hashable,
        columns: Sequence[str],
        sample_ids: Sequence[int] | np.ndarray | None = None,
    ) -> pa.Table:
        """Read rows without consuming them (metrics, recording); `sample_id` first.

        Without `sample_ids`: every live (not evicted) row of the partition, in id order.
        Every requested column must be ready for every requested row.
        """
        context = f"gather from partition {partition!r}"
        cols = _requested_columns(columns, context)
        ids = None if sample_ids is None else _as_ids(sample_ids, context)
        with self._changed:
            self._sweep()
            ids = self._controller.check_gather(partition, cols, ids)
            return self._storage.read(partition, ids, cols)

    def ready(self, partition: Hashable, columns: Sequence[str]) -> np.ndarray:
        """Live sample ids ready for all `columns`, in id order."""
        cols = _requested_columns(columns, f"ready in partition {partition!r}")
        with self._changed:
            self._sweep()
            return self._controller.ready_ids(partition, cols)

    def pending(self, task: str, columns: Sequence[str], partition: Hashable) -> int:
        """How many rows `get` could hand `task` now (ignoring the sampler)."""
        cols = _requested_columns(columns, f"pending for task {task!r}")
        with self._changed:
            self._sweep()
            return self._controller.pending(task, cols, partition)

    def partitions(self) -> list[Hashable]:
        with self._changed:
            self._sweep()
            return self._controller.partitions()

    def num_rows(self, partition: Hashable) -> int:
        """Rows ever added to the partition, evicted ones included."""
        with self._changed:
            self._sweep()
            return self._controller.partition(partition).n

    def schema(self, partition: Hashable) -> pa.Schema:
        """Declared columns of the partition (not `sample_id`), in first-write order."""
        with self._changed:
            self._sweep()
            types = self._controller.partition(partition).types
            return pa.schema([pa.field(name, typ) for name, typ in types.items()])

    def clear(self, partition: Hashable) -> None:
        """Drop the partition's data and metadata; its outstanding leases become invalid."""
        with self._changed:
            self._sweep()
            self._controller.clear(partition)
            self._storage.drop(partition)
            self._changed.notify_all()

    def stats(self) -> dict:
        """Counters for dashboards: O(partitions x columns + leases), never a scan over rows."""
        with self._changed:
            self._sweep()
            stats = self._controller.stats()
            for name, part in stats["partitions"].items():
                part["bytes"] = self._storage.nbytes(name)
            stats["bytes"] = self._storage.nbytes()
            return stats

    # ---- waiting (caller holds the lock) -------------------------------------------------

    def _sweep(self) -> None:
        if self._controller.expire(self._clock()):
            self._changed.notify_all()

    def _drop_evicted(self) -> None:
        for partition, ids in self._controller.pop_evicted():
            self._storage.drop_rows(partition, ids)

    def _deadline(self, lease_timeout: float | None) -> float | None:
        return None if lease_timeout is None else self._clock() + lease_timeout

    def _hopeless(
        self, task: str, partition: Hashable, max_staleness: int | None
    ) -> Callable[[], bool]:
        return lambda: self._controller.exhausted(task, partition, max_staleness)

    def _wait_until(
        self,
        attempt: Callable[[], T | None],
        timeout: float | None,
        give_up: Callable[[], bool] = lambda: False,
    ) -> T | None:
        """`attempt()` until it gives an answer, waiting for changes in between.

        None if `timeout` passes first or `give_up()` says nothing can ever come. Besides
        notifications, a waiter wakes when the next lease deadline is due, since expiry
        can free rows without anyone calling the queue.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            result = attempt()
            if result is not None:
                return result
            if timeout == 0 or give_up():
                return None
            wait = None if end is None else end - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            due = self._controller.next_deadline()
            if due is not None:
                until_due = max(due - self._clock(), 0.0)
                wait = until_due if wait is None else min(wait, until_due)
            self._changed.wait(wait)
            self._sweep()


def _lease(meta: LeaseMeta, batch: pa.RecordBatch) -> Lease:
    return Lease(
        meta.lease_id, meta.task, meta.partition, meta.sample_ids, batch, meta.owner, meta.deadline
    )


def _check_wait(context: str, name: str, value: object) -> None:
    """A wait in seconds: None (forever) or a number >= 0."""
    if value is None:
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or math.isnan(value)
        or value < 0
    ):
        raise QueueError(f"{context}: {name} must be None or seconds >= 0, got {value!r}")


def _check_lease_timeout(context: str, value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise QueueError(f"{context}: lease_timeout must be None or seconds > 0, got {value!r}")


# ---- input normalisation (pure, outside the lock) ---------------------------------------


def _as_batch(data: pa.RecordBatch | pa.Table, context: str) -> pa.RecordBatch:
    if isinstance(data, pa.RecordBatch):
        return data
    if isinstance(data, pa.Table):
        batches = data.to_batches()
        if len(batches) == 1:
            return batches[0]
        if not batches:
            return pa.RecordBatch.from_pylist([], schema=data.schema)
        return pa.concat_batches(batches)
    raise QueueError(f"{context}: expected a pyarrow RecordBatch or Table, got {type(data)}")


def _to_batch(table: pa.Table) -> pa.RecordBatch:
    """One contiguous batch; a single-chunk column is reused as is (no copy)."""
    arrays = []
    for column in table.columns:
        if column.num_chunks == 1:
            arrays.append(column.chunk(0))
        elif column.num_chunks == 0:
            arrays.append(pa.array([], type=column.type))
        else:
            arrays.append(pa.concat_arrays(column.chunks))
    return pa.RecordBatch.from_arrays(arrays, schema=table.schema)


def _as_ids(sample_ids: Sequence[int] | np.ndarray, context: str) -> np.ndarray:
    ids = np.asarray(sample_ids)
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise QueueError(
            f"{context}: sample ids must be a flat sequence of integers, got {ids.dtype} "
            f"with shape {ids.shape}"
        )
    return ids.astype(np.int64, copy=False)


def _requested_columns(columns: Sequence[str], context: str) -> list[str]:
    """Column names in the order asked, minus `sample_id` (always included anyway)."""
    if isinstance(columns, str):
        raise QueueError(f"{context}: columns must be a list of names, got the str {columns!r}")
    cols = [c for c in columns if c != SAMPLE_ID]
    bad = [c for c in cols if not isinstance(c, str)]
    if bad:
        raise QueueError(f"{context}: column names must be str, got {bad}")
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes:
        raise QueueError(f"{context}: columns {dupes} requested more than once")
    return cols


def _column_types(batch: pa.RecordBatch, context: str) -> dict[str, pa.DataType]:
    names = batch.schema.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise QueueError(f"{context}: batch has duplicate columns {dupes}")
    return {field.name: field.type for field in batch.schema}


def _without_echoed_ids(batch: pa.RecordBatch, ids: np.ndarray, context: str) -> pa.RecordBatch:
    if SAMPLE_ID not in batch.schema.names:
        return batch
    column = batch.column(SAMPLE_ID)
    echoed = column.to_numpy(zero_copy_only=False) if column.null_count == 0 else None
    if echoed is None or not np.array_equal(echoed, ids):
        raise QueueError(
            f"{context}: the batch's {SAMPLE_ID!r} column does not match the sample ids "
            f"given {format_ids(ids)}; drop it or pass the same ids"
        )
    return batch.drop_columns([SAMPLE_ID])


def _int_column(batch: pa.RecordBatch, name: str, null: int, context: str) -> np.ndarray | None:
    if name not in batch.schema.names:
        return None
    column = batch.column(name)
    if not pa.types.is_integer(column.type):
        raise QueueError(f"{context}: column {name!r} must be an integer type, got {column.type}")
    filled = pc.fill_null(column, null) if column.null_count else column
    return filled.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _row_meta(batch: pa.RecordBatch, length_columns: Sequence[str], context: str) -> RowMeta:
    """The per-row facts the controller schedules on, extracted where the data is."""
    group_ids = _int_column(batch, GROUP_ID, 0, context)
    grouped = None
    if group_ids is not None:
        grouped = ~batch.column(GROUP_ID).is_null().to_numpy(zero_copy_only=False)
    lengths = None
    for name in length_columns:
        if name not in batch.schema.names:
            continue
        column = batch.column(name)
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            continue
        counts = pc.fill_null(pc.list_value_length(column), 0)
        counts = counts.to_numpy(zero_copy_only=False).astype(np.int64)
        lengths = counts if lengths is None else lengths + counts
    return RowMeta(
        group_ids=group_ids,
        grouped=grouped,
        policy_versions=_int_column(batch, POLICY_VERSION, -1, context),
        lengths=lengths,
    )


def _lease_id(lease: Lease | int) -> int:
    if isinstance(lease, Lease):
        return lease.lease_id
    if isinstance(lease, (int, np.integer)) and not isinstance(lease, bool):
        return int(lease)
    raise QueueError(f"expected a Lease or a lease id, got {lease!r}")
