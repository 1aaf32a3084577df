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
- chunk_live: chunk id -> rows of it not evicted yet (0: the holder drops it)
- reserved: rows producers hold room for (capacity backpressure) but have not committed
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
from asyncflow.runtime.queue.transfer_queue import QueueFull
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
    chunk_live: dict[int, int] = field(default_factory=dict)  # chunk -> rows not yet evicted
    reserved: int = 0  # rows producers reserved room for and have not committed yet
    chunk_of: dict[Hashable, dict[str, np.ndarray]] = field(default_factory=dict)
    offset_of: dict[Hashable, dict[str, np.ndarray]] = field(default_factory=dict)
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
                "tq_reserve": self.reserve,
                "tq_unreserve": self.unreserve,
                "tq_add_rows": self.add_rows,
                "tq_put": self.put,
                "tq_get": self.get,
                "tq_batch": self.batch,
                "tq_ack": self.ack,
                "tq_release": self.release,
                "tq_gather": self.gather,
                "tq_seal": self.seal,
                "tq_set_policy_version": self.set_policy_version,
                "tq_declare_consumers": self.declare_consumers,
                "tq_evict": self.evict,
                "tq_stale": self.stale,
                "tq_is_drained": self.is_drained,
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

    def create(
        self, name: str, capacity_rows: int | None = None, consumers: list[str] | None = None
    ) -> None:
        if name not in self.queues:
            self.queues[name] = QueueState(Controller(capacity_rows, consumers))

    def drop_queue(self, name: str) -> None:
        state = self.queues.pop(name, None)
        if state is not None:
            self._drop_chunks(name, state, list(state.chunks))
            state.notify()

    # ---- writes -----------------------------------------------------------------------

    async def reserve(
        self, name: str, partition, rows: int, types: bytes, timeout: float | None = None
    ) -> None:
        """Backpressure: wait until `rows` more fit the capacity, then hold room for them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self._queue(name)
            ctrl = state.controller
            ctrl.check_add(partition, unpack_types(types), rows)
            if ctrl.room_for(rows + state.reserved):
                state.reserved += rows
                return
            if not await _wait(state, deadline):
                live = ctrl.live_rows()
                raise QueueFull(
                    f"add_rows to partition {partition!r}: queue full, {live} live rows + "
                    f"{rows} new would exceed capacity_rows {ctrl.capacity_rows} (waited "
                    f"{timeout}s); rows are freed when every declared consumer acked them",
                    capacity_rows=ctrl.capacity_rows or 0,
                    live_rows=live,
                    requested=rows,
                )

    def unreserve(self, name: str, rows: int) -> None:
        state = self._queue(name)
        state.reserved = max(0, state.reserved - rows)
        state.notify()

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
        reserved: bool = False,
    ) -> bytes:
        state = self._queue(name)
        ctrl, col_types = state.controller, unpack_types(types)
        if reserved:
            state.reserved -= rows
        ctrl.check_add(partition, col_types, rows)
        if not reserved and not ctrl.room_for(rows + state.reserved):
            raise QueueFull(
                f"add_rows to partition {partition!r}: no room for {rows} rows "
                f"(capacity_rows {ctrl.capacity_rows}); reserve first",
                capacity_rows=ctrl.capacity_rows or 0,
                live_rows=ctrl.live_rows(),
                requested=rows,
            )
        ids = ctrl.new_sample_ids(rows)
        ctrl.commit_add(partition, ids, col_types, unpack_meta(meta))
        n = ctrl.partition(partition).n
        info = ChunkInfo(address, partition, rows, nbytes)
        self._locate(state, partition, chunk_id, info, np.arange(n - rows, n), col_types)
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
        info = ChunkInfo(address, partition, len(ids), nbytes)
        self._locate(state, partition, chunk_id, info, positions, col_types)
        state.notify()

    def _locate(self, state, partition, chunk_id, info, positions, col_types) -> None:
        state.chunks[chunk_id] = info
        state.chunk_live[chunk_id] = info.rows
        capacity = state.controller.partition(partition).rows.capacity
        chunk_cols = state.chunk_of.setdefault(partition, {})
        offset_cols = state.offset_of.setdefault(partition, {})
        for col in col_types:
            for table in (chunk_cols, offset_cols):
                arr = table.get(col)
                if arr is None or len(arr) < capacity:
                    grown = np.full(capacity, -1, dtype=np.int64)
                    if arr is not None:
                        grown[: len(arr)] = arr
                    table[col] = grown
            chunk_cols[col][positions] = chunk_id
            offset_cols[col][positions] = np.arange(len(positions))

    # ---- consumption ------------------------------------------------------------------

    async def get(self, name: str, timeout: float | None = 0.0, **spec) -> list[dict] | None:
        """Lease a micro-batch (or one per DP rank), waiting event-driven up to `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self._queue(name)
            granted = self._take(name, spec)
            if granted is not None:
                return granted
            if self._never(state, spec) or not await _wait(state, deadline):
                return None

    def _never(self, state: QueueState, spec: dict) -> bool:
        """Nothing can ever come: the partition is sealed and the task has nothing left."""
        ctrl = state.controller
        if spec["partition"] not in ctrl.partitions():
            return False
        return ctrl.exhausted(spec["task"], spec["partition"], spec.get("max_staleness"))

    def _take(self, name: str, spec: dict) -> list[dict] | None:
        """Non-blocking: lease rows for `spec` and return one grant per lease, or None."""
        state = self._queue(name)
        ctrl = state.controller
        partition = spec["partition"]
        if partition not in ctrl.partitions():
            return None  # not created yet: a waiter may arrive before the first producer
        sampler = _sampler(spec.get("sampler", "sequential"), spec.get("max_tokens"))
        timeout = spec.get("lease_timeout")
        common = {
            "batch_size": spec.get("batch_size"),
            "sampler": sampler,
            "min_rows": spec.get("min_rows", 1),
            "max_staleness": spec.get("max_staleness"),
            "owner": spec.get("owner"),
            "deadline": None if timeout is None else time.monotonic() + timeout,
        }
        columns = spec["columns"]
        if spec.get("ranks") is None:
            lease = ctrl.take(spec["task"], columns, partition, **common)
            leases = None if lease is None else [lease]
        else:
            leases = ctrl.take_group(
                spec["task"],
                columns,
                partition,
                ranks=spec["ranks"],
                balance=spec.get("balance", "karmarkar_karp"),
                same_view=spec.get("same_view", False),
                **common,
            )
        if not leases:
            return None
        return [
            {
                "lease_id": lease.lease_id,
                "sample_ids": pack(lease.sample_ids),
                "plan": self._plan(state, partition, lease.positions, columns),
            }
            for lease in leases
        ]

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

    def batch(self, name: str, requests: list[dict]) -> list[dict]:
        """Many consumers' non-waiting gets, acks and releases in one message."""
        return run_each(requests, lambda request: self._one(name, request))

    def _one(self, name: str, request: dict):
        op = request.pop("op")
        if op == "ack":
            return self.ack(name, request["lease_id"])
        if op == "release":
            return self.release(name, request["lease_id"])
        if op == "get":
            return self._take(name, request)
        raise QueueError(f"unknown queue operation {op!r}")

    def ack(self, name: str, lease_id: int) -> None:
        state = self._queue(name)
        state.controller.ack(lease_id)
        self._drop_evicted(name, state)
        state.notify()  # acks can free capacity (eviction) and complete same-view groups

    def release(self, name: str, lease_id: int) -> None:
        state = self._queue(name)
        state.controller.release(lease_id)
        state.notify()

    # ---- reads and housekeeping -------------------------------------------------------

    def gather(self, name: str, partition, columns: list[str], sample_ids: bytes | None) -> dict:
        state = self._queue(name)
        ids = state.controller.check_gather(partition, columns, unpack(sample_ids))
        part = state.controller.partition(partition)
        positions, _ = part.rows.locate(ids)
        return {"sample_ids": pack(ids), "plan": self._plan(state, partition, positions, columns)}

    def seal(self, name: str, partition) -> None:
        state = self._queue(name)
        state.controller.seal(partition)
        state.notify()

    def set_policy_version(self, name: str, version: int) -> None:
        state = self._queue(name)
        state.controller.set_policy_version(version)
        state.notify()

    def declare_consumers(self, name: str, partition, tasks: list[str]) -> None:
        state = self._queue(name)
        state.controller.declare_consumers(partition, tasks)
        self._drop_evicted(name, state)
        state.notify()

    def evict(self, name: str, partition, sample_ids: bytes) -> None:
        state = self._queue(name)
        state.controller.evict(partition, unpack(sample_ids))
        self._drop_evicted(name, state)
        state.notify()

    def stale(self, name: str, partition, max_staleness: int) -> bytes:
        return pack(self._queue(name).controller.stale(partition, max_staleness))

    def is_drained(self, name: str, task: str, columns: list[str], partition) -> bool:
        return self._queue(name).controller.is_drained(task, columns, partition)

    def clear(self, name: str, partition) -> None:
        state = self._queue(name)
        state.controller.clear(partition)
        state.chunk_of.pop(partition, None)
        state.offset_of.pop(partition, None)
        state.lost.pop(partition, None)
        dead = [c for c, info in state.chunks.items() if info.partition == partition]
        self._drop_chunks(name, state, dead)
        state.notify()

    def _drop_evicted(self, name: str, state: QueueState) -> None:
        """Evicted rows release their chunks' rows; a chunk with none left is dropped."""
        empty = []
        for partition, ids in state.controller.pop_evicted():
            if partition not in state.chunk_of:
                continue
            positions, _ = state.controller.partition(partition).rows.locate(ids)
            pairs = [
                np.stack([positions, chunks[positions]], axis=1)
                for chunks in state.chunk_of[partition].values()
                if len(chunks) > positions.max(initial=-1)
            ]
            if not pairs:
                continue
            held = np.unique(np.concatenate(pairs), axis=0)  # (row, chunk) once each
            held = held[held[:, 1] >= 0]
            chunk_ids, counts = np.unique(held[:, 1], return_counts=True)
            for chunk_id, count in zip(chunk_ids.tolist(), counts.tolist(), strict=True):
                live = state.chunk_live.get(chunk_id, 0) - count
                state.chunk_live[chunk_id] = live
                if live <= 0:
                    empty.append(chunk_id)
        if empty:
            self._drop_chunks(name, state, empty)

    def _drop_chunks(self, name: str, state: QueueState, chunk_ids: list[int]) -> None:
        """Tell the holders to free the data; fire and forget (a dead holder freed it anyway)."""
        by_address: dict[str, list[int]] = defaultdict(list)
        for chunk_id in chunk_ids:
            info = state.chunks.pop(chunk_id, None)
            state.chunk_live.pop(chunk_id, None)
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
            ended = state.controller.expire(now)
            if ended:
                logger.warning("asyncflow: queue %r: leases %s expired; redelivering", name, ended)
                state.notify()

    def owner_lost(self, owner: str) -> None:
        """A worker or client left: redeliver its leases; rows whose data it held are lost."""
        for name, state in self.queues.items():
            ended = state.controller.release_owner(owner)
            if ended:
                self.scheduler.log_event(
                    "asyncflow",
                    {
                        "action": "leases-redelivered",
                        "queue": name,
                        "leases": ended,
                        "owner": owner,
                    },
                )
            gone = {c for c, info in state.chunks.items() if info.address == owner}
            if gone:
                self._mark_lost(name, state, gone)
            state.notify()

    def _mark_lost(self, name: str, state: QueueState, chunk_ids: set[int]) -> None:
        """Rows whose data is gone are evicted for every task and reported as lost."""
        for partition, columns in state.chunk_of.items():
            part = state.controller.partition(partition)
            n = part.n
            hit = np.zeros(n, dtype=bool)
            for chunks in columns.values():
                m = min(n, len(chunks))  # a column's array grows only when it is written
                hit[:m] |= np.isin(chunks[:m], list(chunk_ids))
            hit &= ~part.evicted[:n]
            if not hit.any():
                continue
            rows = np.flatnonzero(hit)
            state.controller.lose(partition, rows)
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
        self._drop_evicted(name, state)


async def _wait(state: QueueState, deadline: float | None) -> bool:
    """Wait for the queue to change; False once `deadline` (monotonic) has passed."""
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        return False
    try:
        await asyncio.wait_for(state.changed.wait(), remaining)
    except TimeoutError:
        return False
    return True


def _sampler(name: str, max_tokens: int | None):
    if name == "token_budget":
        if max_tokens is None:
            raise QueueError("sampler 'token_budget' needs max_tokens")
        return samplers.token_budget(max_tokens)
    if name not in SAMPLERS:
        known = [*sorted(SAMPLERS), "token_budget"]
        raise QueueError(f"unknown sampler {name!r}; known: {known}")
    return SAMPLERS[name]


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
