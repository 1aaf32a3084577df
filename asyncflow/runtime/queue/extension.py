"""The metadata half of the distributed TransferQueue, living on the Dask scheduler.

Like Dask's own Queue and Semaphore, the controller is a scheduler extension: one hop from
every worker and client, and it survives any worker's death. It holds only metadata (the
same `Controller` the in-process queue uses) plus *where* each column of each row is
stored: (chunk id, offset), a chunk being one put's RecordBatch kept by the process that
produced it (`chunk_store.py`). Bulk data never passes through the scheduler.

Handlers are named `tq_<verb>`. Waiting consumers wait on an asyncio event that every
commit, release and clear replaces, so a waiter never blocks the loop or another waiter
and nothing sleep-polls. Leases belong to an owner (a worker address or client id):
when that owner leaves the cluster, or a lease's deadline passes, its rows go back to
the task (redelivery). Rows whose data lived on a lost worker are marked lost: no task
is handed them again, and `tq_lost` reports them so the source can replace them.

State shapes (per named queue, `QueueState`):
- controller: Controller (rows, readiness, per-task consumption, leases)
- chunks: chunk id -> ChunkInfo(address, partition, rows, nbytes)
- chunk_of / offset_of: partition -> column -> int64[capacity] (chunk id / row offset; -1 none)
- owner_of / deadline_of: lease id -> owner / monotonic deadline (only leases in flight)
- lost: partition -> list of sample ids whose data is gone
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from asyncflow.errors import QueueError
from asyncflow.runtime.queue import samplers
from asyncflow.runtime.queue.coalesce import run_each
from asyncflow.runtime.queue.controller import Controller
from asyncflow.runtime.queue.wire import pack, unpack, unpack_meta, unpack_types

logger = logging.getLogger(__name__)

EXTENSION = "asyncflow_transfer_queue"
SAMPLERS = {"sequential": samplers.sequential, "group_preserving": samplers.group_preserving}


@dataclass(frozen=True)
class ChunkInfo:
    address: str
    partition: Hashable
    rows: int
    nbytes: int


@dataclass
class QueueState:
    controller: Controller = field(default_factory=Controller)
    chunks: dict[int, ChunkInfo] = field(default_factory=dict)
    chunk_of: dict[Hashable, dict[str, np.ndarray]] = field(default_factory=dict)
    offset_of: dict[Hashable, dict[str, np.ndarray]] = field(default_factory=dict)
    owner_of: dict[int, str] = field(default_factory=dict)
    deadline_of: dict[int, float] = field(default_factory=dict)
    lost: dict[Hashable, list[int]] = field(default_factory=lambda: defaultdict(list))
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        """Wake every waiter (they re-check); later waiters wait on a fresh event."""
        self.changed.set()
        self.changed = asyncio.Event()


class TransferQueueExtension:
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.queues: dict[str, QueueState] = {}
        scheduler.handlers.update(
            {
                "tq_create": self.create,
                "tq_add_rows": self.add_rows,
                "tq_put": self.put,
                "tq_get": self.get,
                "tq_batch": self.batch,
                "tq_ack": self.ack,
                "tq_release": self.release,
                "tq_gather": self.gather,
                "tq_clear": self.clear,
                "tq_stats": self.stats,
                "tq_lost": self.lost,
                "tq_drop_queue": self.drop_queue,
            }
        )
        self._sweeper = PeriodicCallback(self._expire_leases, 100)
        scheduler.periodic_callbacks["asyncflow-tq-lease-expiry"] = self._sweeper
        self._sweeper.start()

    # ---- queues -----------------------------------------------------------------------

    def _queue(self, name: str) -> QueueState:
        state = self.queues.get(name)
        if state is None:
            raise QueueError(f"no TransferQueue named {name!r} on this cluster")
        return state

    def create(self, name: str) -> None:
        self.queues.setdefault(name, QueueState())

    def drop_queue(self, name: str) -> None:
        state = self.queues.pop(name, None)
        if state is not None:
            self._drop_chunks(name, state, list(state.chunks))
            state.notify()

    # ---- writes -----------------------------------------------------------------------

    def add_rows(
        self,
        name: str,
        partition,
        chunk_id: int,
        address: str,
        rows: int,
        nbytes: int,
        types: bytes,
        meta: dict,
    ) -> bytes:
        state = self._queue(name)
        ctrl, col_types = state.controller, unpack_types(types)
        ctrl.check_types(partition, col_types)
        ids = ctrl.new_sample_ids(rows)
        ctrl.commit_add(partition, ids, col_types, unpack_meta(meta))
        positions = np.arange(ctrl.partition(partition).n - rows, ctrl.partition(partition).n)
        self._locate(
            state,
            partition,
            chunk_id,
            ChunkInfo(address, partition, rows, nbytes),
            positions,
            col_types,
        )
        state.notify()
        return pack(ids)

    def put(
        self,
        name: str,
        partition,
        sample_ids: bytes,
        chunk_id: int,
        address: str,
        nbytes: int,
        types: bytes,
        meta: dict,
        producer: str | None = None,
    ) -> None:
        state = self._queue(name)
        ids, col_types = unpack(sample_ids), unpack_types(types)
        positions = state.controller.check_put(partition, ids, col_types)
        state.controller.commit_put(partition, positions, col_types, producer, unpack_meta(meta))
        self._locate(
            state,
            partition,
            chunk_id,
            ChunkInfo(address, partition, len(ids), nbytes),
            positions,
            col_types,
        )
        state.notify()

    def _locate(self, state, partition, chunk_id, info, positions, col_types) -> None:
        state.chunks[chunk_id] = info
        capacity = state.controller.partition(partition).rows.capacity
        chunk_cols = state.chunk_of.setdefault(partition, {})
        offset_cols = state.offset_of.setdefault(partition, {})
        for col in col_types:
            for table, fill in ((chunk_cols, -1), (offset_cols, -1)):
                arr = table.get(col)
                if arr is None or len(arr) < capacity:
                    grown = np.full(capacity, fill, dtype=np.int64)
                    if arr is not None:
                        grown[: len(arr)] = arr
                    table[col] = grown
            chunk_cols[col][positions] = chunk_id
            offset_cols[col][positions] = np.arange(len(positions))

    # ---- consumption ------------------------------------------------------------------

    async def get(
        self,
        name: str,
        task: str,
        columns: list[str],
        partition,
        batch_size: int | None = None,
        sampler: str = "sequential",
        owner: str | None = None,
        lease_timeout: float | None = None,
        timeout: float | None = 0.0,
        min_rows: int = 1,
    ) -> dict | None:
        """Lease a micro-batch, waiting (event-driven) up to `timeout` s for enough rows."""
        if sampler not in SAMPLERS:
            raise QueueError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self._queue(name)
            event = state.changed
            granted = self._try_lease(
                state,
                task,
                columns,
                partition,
                batch_size,
                SAMPLERS[sampler],
                owner,
                lease_timeout,
                min_rows,
            )
            if granted is not None:
                return granted
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    def batch(self, name: str, requests: list[dict]) -> list[dict]:
        """Many consumers' non-waiting gets, acks and releases in one message."""
        return run_each(requests, lambda request: self._one(name, request))

    def _one(self, name: str, request: dict):
        op = request["op"]
        if op == "ack":
            return self.ack(name, request["lease_id"])
        if op == "release":
            return self.release(name, request["lease_id"])
        if op == "get":
            sampler = request["sampler"]
            if sampler not in SAMPLERS:
                raise QueueError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
            return self._try_lease(
                self._queue(name),
                request["task"],
                request["columns"],
                request["partition"],
                request["batch_size"],
                SAMPLERS[sampler],
                request["owner"],
                request["lease_timeout"],
                request["min_rows"],
            )
        raise QueueError(f"unknown queue operation {op!r}")

    def _try_lease(
        self, state, task, columns, partition, batch_size, sampler, owner, lease_timeout, min_rows
    ) -> dict | None:
        ctrl = state.controller
        if partition not in ctrl.partitions():
            return None  # not created yet: a waiter may arrive before the first producer
        positions, cands = ctrl.candidates(task, columns, partition)
        if len(cands) < min_rows:
            return None
        chosen = np.asarray(sampler(cands, batch_size), dtype=np.int64)
        if len(chosen) < min_rows or len(chosen) == 0:
            return None
        picked = positions[np.searchsorted(cands.sample_ids, chosen)]
        lease_id = ctrl.lease(task, partition, picked, chosen)
        if owner is not None:
            state.owner_of[lease_id] = owner
        if lease_timeout is not None:
            state.deadline_of[lease_id] = time.monotonic() + lease_timeout
        return {
            "lease_id": lease_id,
            "sample_ids": pack(chosen),
            "plan": self._plan(state, partition, picked, columns),
        }

    def _plan(self, state, partition, positions: np.ndarray, columns: list[str]) -> list[dict]:
        """Which chunk pieces make up these rows' columns: one entry per chunk touched."""
        pieces: dict[int, dict] = {}
        for col in columns:
            chunks = state.chunk_of[partition][col][positions]
            offsets = state.offset_of[partition][col][positions]
            for chunk_id in np.unique(chunks):
                rows = np.flatnonzero(chunks == chunk_id)
                piece = pieces.get(int(chunk_id))
                if piece is None:
                    info = state.chunks[int(chunk_id)]
                    piece = pieces[int(chunk_id)] = {
                        "chunk_id": int(chunk_id),
                        "address": info.address,
                        "rows": pack(rows),
                        "offsets": pack(offsets[rows]),
                        "columns": [],
                    }
                piece["columns"].append(col)
        return list(pieces.values())

    def ack(self, name: str, lease_id: int) -> None:
        state = self._queue(name)
        self._forget_lease(state, lease_id)
        state.controller.ack(lease_id)

    def release(self, name: str, lease_id: int) -> None:
        state = self._queue(name)
        self._forget_lease(state, lease_id)
        state.controller.release(lease_id)
        state.notify()

    def _forget_lease(self, state: QueueState, lease_id: int) -> None:
        state.owner_of.pop(lease_id, None)
        state.deadline_of.pop(lease_id, None)

    # ---- reads and housekeeping -------------------------------------------------------

    def gather(self, name: str, partition, columns: list[str], sample_ids: bytes | None) -> dict:
        state = self._queue(name)
        ids = state.controller.check_gather(partition, columns, unpack(sample_ids))
        part = state.controller.partition(partition)
        positions, _ = part.rows.locate(ids)
        return {"sample_ids": pack(ids), "plan": self._plan(state, partition, positions, columns)}

    def clear(self, name: str, partition) -> None:
        state = self._queue(name)
        state.controller.clear(partition)
        state.chunk_of.pop(partition, None)
        state.offset_of.pop(partition, None)
        state.lost.pop(partition, None)
        dead = [c for c, info in state.chunks.items() if info.partition == partition]
        self._drop_chunks(name, state, dead)
        state.notify()

    def _drop_chunks(self, name: str, state: QueueState, chunk_ids: list[int]) -> None:
        """Tell the holders to free the data; fire and forget (a dead holder freed it anyway)."""
        by_address: dict[str, list[int]] = defaultdict(list)
        for chunk_id in chunk_ids:
            info = state.chunks.pop(chunk_id, None)
            if info is not None and info.address in self.scheduler.workers:
                by_address[info.address].append(chunk_id)
        for address, ids in by_address.items():
            self.scheduler.loop.add_callback(self._send_drop, address, name, ids)

    async def _send_drop(self, address: str, name: str, chunk_ids: list[int]) -> None:
        try:
            await self.scheduler.rpc(address).tq_drop(queue=name, chunk_ids=chunk_ids)
        except Exception as exc:  # the worker may be gone; its memory went with it
            logger.debug("asyncflow: dropping chunks on %s failed: %r", address, exc)

    def stats(self, name: str) -> dict:
        state = self._queue(name)
        stats = state.controller.stats()
        stats["chunks"] = len(state.chunks)
        stats["bytes"] = sum(info.nbytes for info in state.chunks.values())
        stats["lost_rows"] = sum(len(v) for v in state.lost.values())
        stats["partitions"] = {str(k): v for k, v in stats["partitions"].items()}
        return stats

    def lost(self, name: str, partition) -> bytes:
        return pack(np.asarray(self._queue(name).lost.get(partition, []), dtype=np.int64))

    # ---- failures ---------------------------------------------------------------------

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for name, state in self.queues.items():
            expired = [lid for lid, deadline in state.deadline_of.items() if deadline <= now]
            for lease_id in expired:
                logger.warning(
                    "asyncflow: lease %d of queue %r expired; redelivering", lease_id, name
                )
                self.release(name, lease_id)

    def owner_lost(self, owner: str) -> None:
        """A worker or client left: redeliver its leases; rows whose data it held are lost."""
        for name, state in self.queues.items():
            for lease_id in [lid for lid, o in state.owner_of.items() if o == owner]:
                self.release(name, lease_id)
                self.scheduler.log_event(
                    "asyncflow",
                    {
                        "action": "lease-redelivered",
                        "queue": name,
                        "lease": lease_id,
                        "owner": owner,
                    },
                )
            gone = [c for c, info in state.chunks.items() if info.address == owner]
            if gone:
                self._mark_lost(name, state, set(gone))

    def _mark_lost(self, name: str, state: QueueState, chunk_ids: set[int]) -> None:
        """Hide rows whose data is gone from every task (all columns unready, tasks done)."""
        for partition, columns in state.chunk_of.items():
            part = state.controller.partition(partition)
            n = part.n
            hit = np.zeros(n, dtype=bool)
            for chunks in columns.values():
                m = min(n, len(chunks))  # a column's array grows only when it is written
                hit[:m] |= np.isin(chunks[:m], list(chunk_ids))
            if not hit.any():
                continue
            rows = np.flatnonzero(hit)
            for col, ready in part.ready.items():
                part.ready_count[col] -= int(np.count_nonzero(ready[rows]))
                ready[rows] = False
            part.grouped[rows] = False  # survivors of a group form a complete group
            ids = part.rows.ids[rows].tolist()
            state.lost[partition].extend(ids)
            logger.warning(
                "asyncflow: queue %r lost %d rows of partition %r with their worker",
                name,
                len(ids),
                partition,
            )
            self.scheduler.log_event(
                "asyncflow",
                {
                    "action": "rows-lost",
                    "queue": name,
                    "partition": str(partition),
                    "rows": len(ids),
                },
            )
        for chunk_id in chunk_ids:
            state.chunks.pop(chunk_id, None)
        state.notify()


class TransferQueueSchedulerPlugin(SchedulerPlugin):
    """Installs the extension; registering it twice is harmless (same name)."""

    name = "asyncflow-transfer-queue"

    async def start(self, scheduler) -> None:
        if EXTENSION not in scheduler.extensions:
            scheduler.extensions[EXTENSION] = TransferQueueExtension(scheduler)

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        ext = scheduler.extensions.get(EXTENSION)
        if ext is not None and scheduler.status == Status.running:  # not at shutdown
            ext.owner_lost(worker)

    def remove_client(self, scheduler, client: str) -> None:
        ext = scheduler.extensions.get(EXTENSION)
        if ext is not None:
            ext.owner_lost(client)


def dask_setup(scheduler) -> None:
    """`dask scheduler --preload asyncflow.runtime.queue.extension` installs it up front."""
    scheduler.add_plugin(TransferQueueSchedulerPlugin())
