"""The data half of the distributed TransferQueue: Arrow chunks kept where they were produced.

Every process that puts into a distributed queue keeps what it wrote here, as the
RecordBatch it wrote (one "chunk" per put). Peers fetch slices of chunks over Dask's
comms (`tq_fetch` on the worker), and a reader in the same process gets zero-copy
slices. Only the scheduler's controller knows which rows and columns a chunk holds.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from asyncflow.errors import QueueError


class ChunkStore:
    """Chunks by (queue name, chunk id); thread-safe, since actors and the loop both use it."""

    def __init__(self) -> None:
        self._chunks: dict[tuple[str, int], pa.RecordBatch] = {}
        self._lock = threading.Lock()

    def put(self, queue: str, chunk_id: int, batch: pa.RecordBatch) -> None:
        with self._lock:
            self._chunks[(queue, chunk_id)] = batch

    def take(
        self, queue: str, chunk_id: int, offsets: np.ndarray, columns: Sequence[str]
    ) -> pa.RecordBatch:
        """Rows `offsets` (in that order) of the chunk's `columns`; a slice when contiguous."""
        with self._lock:
            batch = self._chunks.get((queue, chunk_id))
        if batch is None:
            raise QueueError(f"queue {queue!r}: chunk {chunk_id} is not stored in this process")
        batch = batch.select(list(columns))
        if len(offsets) and _is_range(offsets):
            return batch.slice(int(offsets[0]), len(offsets))
        return batch.take(pa.array(offsets, pa.int64()))

    def is_whole(self, queue: str, chunk_id: int, offsets: np.ndarray) -> bool:
        """Do these offsets cover the whole chunk in order (so it can ship as is)?"""
        with self._lock:
            batch = self._chunks.get((queue, chunk_id))
        return (
            batch is not None
            and len(offsets) == batch.num_rows
            and (len(offsets) == 0 or (_is_range(offsets) and offsets[0] == 0))
        )

    def drop(self, queue: str, chunk_ids: Sequence[int]) -> int:
        """Forget chunks; returns the bytes freed."""
        freed = 0
        with self._lock:
            for chunk_id in chunk_ids:
                batch = self._chunks.pop((queue, int(chunk_id)), None)
                if batch is not None:
                    freed += batch.nbytes
        return freed

    def drop_queue(self, queue: str) -> None:
        with self._lock:
            for key in [k for k in self._chunks if k[0] == queue]:
                del self._chunks[key]

    def nbytes(self, queue: str | None = None) -> int:
        with self._lock:
            return sum(b.nbytes for (q, _), b in self._chunks.items() if queue in (None, q))

    def __len__(self) -> int:
        with self._lock:
            return len(self._chunks)


def _is_range(offsets: np.ndarray) -> bool:
    return bool(offsets[-1] - offsets[0] == len(offsets) - 1 and np.all(np.diff(offsets) == 1))


# One store per process: the worker plugin serves it to peers, the queue handle fills it.
STORE = ChunkStore()
