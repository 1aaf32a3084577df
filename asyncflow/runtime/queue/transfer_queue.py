"""TransferQueue: the buffer every operator reads ready rows from and writes new columns to.

The facade owns the order of operations that makes writes safe: validate everything (shape,
types, ids, write-once) against the controller, then store the data, then mark the rows
ready. A reader can therefore never see a column whose data is not there, and a rejected
write leaves nothing behind. One lock serialises the facade, because the executor calls it
from several threads; Arrow arrays are immutable, so building a lease's batch happens
outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asyncflow.errors import QueueError
from asyncflow.runtime.queue import samplers
from asyncflow.runtime.queue.controller import Controller, RowMeta, format_ids
from asyncflow.runtime.queue.samplers import Candidates, Sampler
from asyncflow.runtime.queue.storage import Storage

SAMPLE_ID = "sample_id"
GROUP_ID = "group_id"
POLICY_VERSION = "policy_version"
DEFAULT_LENGTH_COLUMNS = ("prompt_ids", "response_ids")


@dataclass(frozen=True, eq=False)
class Lease:
    """A micro-batch handed to one task; ack it once its outputs are stored, else release."""

    lease_id: int
    task: str
    partition: Hashable
    sample_ids: np.ndarray  # int64[k], row order of `batch`
    batch: pa.RecordBatch  # `sample_id` then the requested columns

    def __len__(self) -> int:
        return len(self.sample_ids)


class TransferQueue:
    """Arrow-native, column-oriented sample buffer with per-task consumption and leases.

    `length_columns` are the list columns whose lengths add up to a row's token count,
    which samplers see as `Candidates.lengths` (e.g. for token-balanced batches).
    """

    def __init__(self, length_columns: Sequence[str] = DEFAULT_LENGTH_COLUMNS) -> None:
        self._controller = Controller()
        self._storage = Storage()
        self._length_columns = tuple(length_columns)
        self._lock = threading.Lock()

    # ---- writes -----------------------------------------------------------------------

    def add_rows(self, partition: Hashable, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        """Append new rows (creating the partition if needed); return their new sample ids.

        Ids come from one global counter so they are unique across partitions and a
        partition's rows are always in id order. An empty batch still creates the partition
        and declares its columns' types.
        """
        context = f"add_rows to partition {partition!r}"
        batch = _as_batch(batch, context)
        if SAMPLE_ID in batch.schema.names:
            raise QueueError(
                f"{context}: the batch has a {SAMPLE_ID!r} column; sample ids are assigned by "
                "the queue, drop that column"
            )
        types = _column_types(batch, context)
        meta = _row_meta(batch, self._length_columns, context)
        with self._lock:
            self._controller.check_types(partition, types)
            ids = self._controller.new_sample_ids(batch.num_rows)
            self._storage.add_rows(partition, ids)
            self._storage.store(partition, ids, batch)
            self._controller.commit_add(partition, ids, types, meta)
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
        with self._lock:
            positions = self._controller.check_put(partition, ids, types)
            self._storage.store(partition, ids, batch)
            self._controller.commit_put(partition, positions, types, producer, meta)

    # ---- consumption ------------------------------------------------------------------

    def get(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        *,
        batch_size: int | None = None,
        sampler: Sampler = samplers.sequential,
    ) -> Lease | None:
        """Lease up to `batch_size` rows ready for `columns` that `task` has not taken yet.

        Returns None when nothing (or nothing the sampler accepts, e.g. no complete group)
        is available. A column never written to the partition is simply not ready.
        """
        cols = _requested_columns(columns, f"get for task {task!r}")
        if not isinstance(task, str):
            raise QueueError(f"get: task must be a str naming the consumer, got {task!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise QueueError(f"get for task {task!r}: batch_size must be >= 1, got {batch_size}")
        with self._lock:
            positions, cands = self._controller.candidates(task, cols, partition)
            if len(cands) == 0:
                return None
            chosen = _checked_choice(sampler, cands, batch_size)
            if len(chosen) == 0:
                return None
            table = self._storage.read(partition, chosen, cols)
            picked = positions[np.searchsorted(cands.sample_ids, chosen)]
            lease_id = self._controller.lease(task, partition, picked, chosen)
        try:
            batch = _to_batch(table)
        except BaseException:
            self.release(lease_id)
            raise
        return Lease(lease_id, task, partition, chosen, batch)

    def ack(self, lease: Lease | int) -> None:
        """The lease's outputs are stored: its rows are consumed by its task for good."""
        with self._lock:
            self._controller.ack(_lease_id(lease))

    def release(self, lease: Lease | int) -> None:
        """The consumer failed: hand the lease's rows to its task again later."""
        with self._lock:
            self._controller.release(_lease_id(lease))

    # ---- reads ------------------------------------------------------------------------

    def gather(
        self,
        partition: Hashable,
        columns: Sequence[str],
        sample_ids: Sequence[int] | np.ndarray | None = None,
    ) -> pa.Table:
        """Read rows without consuming them (metrics, recording); `sample_id` first.

        Without `sample_ids`: every row of the partition, in id order. Every requested
        column must be ready for every requested row.
        """
        context = f"gather from partition {partition!r}"
        cols = _requested_columns(columns, context)
        ids = None if sample_ids is None else _as_ids(sample_ids, context)
        with self._lock:
            ids = self._controller.check_gather(partition, cols, ids)
            return self._storage.read(partition, ids, cols)

    def ready(self, partition: Hashable, columns: Sequence[str]) -> np.ndarray:
        """Sample ids ready for all `columns`, in id order."""
        cols = _requested_columns(columns, f"ready in partition {partition!r}")
        with self._lock:
            return self._controller.ready_ids(partition, cols)

    def pending(self, task: str, columns: Sequence[str], partition: Hashable) -> int:
        """How many rows `get` could hand `task` now (ignoring the sampler)."""
        cols = _requested_columns(columns, f"pending for task {task!r}")
        with self._lock:
            return self._controller.pending(task, cols, partition)

    def partitions(self) -> list[Hashable]:
        with self._lock:
            return self._controller.partitions()

    def num_rows(self, partition: Hashable) -> int:
        with self._lock:
            return self._controller.partition(partition).n

    def schema(self, partition: Hashable) -> pa.Schema:
        """Declared columns of the partition (not `sample_id`), in first-write order."""
        with self._lock:
            types = self._controller.partition(partition).types
            return pa.schema([pa.field(name, typ) for name, typ in types.items()])

    def clear(self, partition: Hashable) -> None:
        """Drop the partition's data and metadata; its outstanding leases become invalid."""
        with self._lock:
            self._controller.clear(partition)
            self._storage.drop(partition)

    def stats(self) -> dict:
        """Counters for dashboards: O(partitions x columns), never a scan over rows."""
        with self._lock:
            stats = self._controller.stats()
            for name, part in stats["partitions"].items():
                part["bytes"] = self._storage.nbytes(name)
            stats["bytes"] = self._storage.nbytes()
            return stats


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


def _checked_choice(sampler: Sampler, cands: Candidates, batch_size: int | None) -> np.ndarray:
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


def _lease_id(lease: Lease | int) -> int:
    if isinstance(lease, Lease):
        return lease.lease_id
    if isinstance(lease, (int, np.integer)) and not isinstance(lease, bool):
        return int(lease)
    raise QueueError(f"expected a Lease or a lease id, got {lease!r}")
