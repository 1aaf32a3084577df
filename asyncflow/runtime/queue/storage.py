"""Queue data: the Arrow columns of every row, kept as the batches producers wrote.

Each write is stored as-is (one chunk = one RecordBatch of the columns written for some
rows); an index maps (column, sample id) -> (chunk, offset). Reads slice those chunks, so a
micro-batch read in the order it was written is zero-copy, and anything else costs one
`take`. Storage trusts the controller: it never decides readiness and is only asked for
rows the controller has validated.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import pyarrow as pa

from asyncflow.runtime.queue.controller import RowIndex, grown

# Read a column as slices of the stored chunks while that makes few enough pieces;
# beyond this many runs per row, one gather (`take`) is cheaper than many tiny slices.
_MIN_RUNS_FOR_TAKE = 8
_ROWS_PER_RUN_FOR_SLICES = 16


class _ColumnIndex:
    """Where one column of each row lives: int32/int64[capacity], aligned with row positions."""

    def __init__(self, capacity: int, dtype: pa.DataType) -> None:
        self.dtype = dtype
        self.chunk = np.full(capacity, -1, dtype=np.int32)  # chunk number, -1 = not stored
        self.offset = np.zeros(capacity, dtype=np.int64)  # row within that chunk

    def grow(self, capacity: int) -> None:
        if capacity > len(self.chunk):
            self.chunk = grown(self.chunk, capacity, -1)
            self.offset = grown(self.offset, capacity, 0)


class PartitionData:
    def __init__(self) -> None:
        self.rows = RowIndex()
        # chunk number -> RecordBatch exactly as written (columns of one write)
        self.chunks: list[pa.RecordBatch] = []
        # column name -> where each row's value of that column lives
        self.columns: dict[str, _ColumnIndex] = {}
        self.nbytes = 0

    def positions(self, sample_ids: np.ndarray) -> np.ndarray:
        positions, found = self.rows.locate(sample_ids)
        if not found.all():
            raise RuntimeError(f"internal: storage has no rows {sample_ids[~found][:8]}")
        return positions


class Storage:
    def __init__(self) -> None:
        # partition key -> its data
        self._partitions: dict[Hashable, PartitionData] = {}

    def add_rows(self, partition: Hashable, sample_ids: np.ndarray) -> None:
        part = self._partitions.setdefault(partition, PartitionData())
        part.rows.append(sample_ids)
        for index in part.columns.values():
            index.grow(part.rows.capacity)

    def store(self, partition: Hashable, sample_ids: np.ndarray, batch: pa.RecordBatch) -> None:
        """Keep `batch` as one chunk and index its columns for `sample_ids` (same order)."""
        part = self._partitions[partition]
        for field in batch.schema:  # even an empty write declares its columns
            if field.name not in part.columns:
                part.columns[field.name] = _ColumnIndex(part.rows.capacity, field.type)
        if batch.num_columns == 0 or batch.num_rows == 0:
            return
        positions = part.positions(sample_ids)
        number = len(part.chunks)
        part.chunks.append(batch)
        part.nbytes += batch.nbytes
        offsets = np.arange(batch.num_rows, dtype=np.int64)
        for field in batch.schema:
            index = part.columns[field.name]
            index.chunk[positions] = number
            index.offset[positions] = offsets

    def read(self, partition: Hashable, sample_ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """A table of `sample_id` then `columns`, rows in the order of `sample_ids`."""
        part = self._partitions[partition]
        positions = part.positions(sample_ids)
        arrays = [pa.chunked_array([pa.array(sample_ids, type=pa.int64())])]
        for name in columns:
            arrays.append(self._read_column(part, name, positions))
        return pa.Table.from_arrays(arrays, names=["sample_id", *columns])

    def drop(self, partition: Hashable) -> None:
        self._partitions.pop(partition, None)

    def nbytes(self, partition: Hashable | None = None) -> int:
        if partition is not None:
            return self._partitions[partition].nbytes
        return sum(p.nbytes for p in self._partitions.values())

    @staticmethod
    def _read_column(part: PartitionData, name: str, positions: np.ndarray) -> pa.ChunkedArray:
        index = part.columns[name]
        chunk = index.chunk[positions]
        offset = index.offset[positions]
        if (chunk < 0).any():
            raise RuntimeError(f"internal: column {name!r} missing for rows the controller saw")
        n = len(positions)
        if n == 0:
            return pa.chunked_array([], type=index.dtype)
        breaks = np.flatnonzero((chunk[1:] != chunk[:-1]) | (offset[1:] != offset[:-1] + 1)) + 1
        starts = np.concatenate([[0], breaks])
        if len(starts) <= max(_MIN_RUNS_FOR_TAKE, n // _ROWS_PER_RUN_FOR_SLICES):
            ends = np.concatenate([breaks, [n]])
            pieces = [
                part.chunks[chunk[s]].column(name).slice(offset[s], e - s)
                for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
            ]
            return pa.chunked_array(pieces, type=index.dtype)
        return Storage._take_scattered(part, name, chunk, offset, index.dtype)

    @staticmethod
    def _take_scattered(
        part: PartitionData,
        name: str,
        chunk: np.ndarray,
        offset: np.ndarray,
        dtype: pa.DataType,
    ) -> pa.ChunkedArray:
        """One `take` over just the chunks involved, addressed by offsets into their concat."""
        used, local = np.unique(chunk, return_inverse=True)
        sources = [part.chunks[c].column(name) for c in used.tolist()]
        starts = np.cumsum([0] + [len(a) for a in sources[:-1]], dtype=np.int64)
        indices = starts[local.reshape(-1)] + offset
        taken = pa.chunked_array(sources, type=dtype).take(pa.array(indices, type=pa.int64()))
        return taken


class EvictingStorage(Storage):
    """Storage that forgets single rows, freeing a written chunk once none of its rows is left.

    Eviction is per row but memory is per chunk (one write), so each chunk counts its live
    rows; the chunk is let go when that reaches zero. Leases already handed out keep their
    slices alive, as Arrow buffers are reference counted.
    """

    def __init__(self) -> None:
        super().__init__()
        # partition -> live rows per chunk, aligned with that partition's chunk list
        self._live_in_chunk: dict[Hashable, list[int]] = {}

    def store(self, partition: Hashable, sample_ids: np.ndarray, batch: pa.RecordBatch) -> None:
        part = self._partitions[partition]
        before = len(part.chunks)
        super().store(partition, sample_ids, batch)
        if len(part.chunks) > before:
            self._live_in_chunk.setdefault(partition, []).append(batch.num_rows)

    def drop_rows(self, partition: Hashable, sample_ids: np.ndarray) -> None:
        """Forget these rows' data; later reads of them are the controller's to refuse."""
        part = self._partitions.get(partition)
        if part is None or len(sample_ids) == 0:
            return
        positions = part.positions(sample_ids)
        held = [np.empty((0, 2), dtype=np.int64)]  # (position, chunk) pairs still referenced
        for index in part.columns.values():
            chunk = index.chunk[positions]
            stored = chunk >= 0
            held.append(np.stack([positions[stored], chunk[stored].astype(np.int64)], axis=1))
            index.chunk[positions] = -1
        pairs = np.unique(np.concatenate(held), axis=0)  # a row counts once per chunk
        chunks, rows = np.unique(pairs[:, 1], return_counts=True)
        live = self._live_in_chunk[partition]
        for number, count in zip(chunks.tolist(), rows.tolist(), strict=True):
            live[number] -= count
            if live[number] == 0:
                part.nbytes -= part.chunks[number].nbytes
                part.chunks[number] = None  # type: ignore[call-overload]

    def drop(self, partition: Hashable) -> None:
        super().drop(partition)
        self._live_in_chunk.pop(partition, None)

    def chunks_held(self, partition: Hashable) -> int:
        """Chunks of the partition still in memory (for tests and stats)."""
        return sum(1 for live in self._live_in_chunk.get(partition, ()) if live > 0)
