"""DistributedTransferQueue: the same API as the in-process queue, across a Dask cluster.

A thin handle, like `distributed.Queue`: it pickles by name and binds late to whatever
client or worker it lands on, so operators on any worker can pass it around. Writes keep
their data in the writing process (`chunk_store.STORE`; from a client, on a worker picked
round-robin) and commit metadata to the scheduler extension; a lease comes back as a
plan of chunk pieces, fetched peer to peer (zero-copy when local) and assembled in lease
order. Every method has an async twin: call `await q.get(...)` on an asynchronous client
or from a worker's event loop, plain `q.get(...)` elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import weakref
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from distributed import get_client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import to_serialize

from asyncflow.errors import QueueError
from asyncflow.runtime.queue.chunk_store import STORE
from asyncflow.runtime.queue.coalesce import Coalescer, run_each
from asyncflow.runtime.queue.extension import EXTENSION, TransferQueueSchedulerPlugin
from asyncflow.runtime.queue.transfer_queue import (
    DEFAULT_LENGTH_COLUMNS,
    SAMPLE_ID,
    Lease,
    _as_batch,
    _as_ids,
    _column_types,
    _lease_id,
    _requested_columns,
    _row_meta,
    _without_echoed_ids,
)
from asyncflow.runtime.queue.wire import pack, pack_meta, pack_types, unpack

logger = logging.getLogger(__name__)


class TransferQueueWorkerPlugin(WorkerPlugin):
    """Serves this worker's chunks to peers: `tq_fetch`, `tq_store`, `tq_drop`."""

    name = "asyncflow-transfer-queue"

    def setup(self, worker) -> None:
        worker.handlers.update({"tq_fetch": _fetch, "tq_store": _store, "tq_drop": _drop})


def _fetch(queue: str, requests: list[list[dict]]) -> list[dict]:
    """Several consumers' pieces in one message; each request answered on its own."""
    return run_each(requests, lambda pieces: [_take(queue, p) for p in pieces])


def _take(queue: str, piece: dict):
    offsets = unpack(piece["offsets"])
    batch = STORE.take(queue, piece["chunk_id"], offsets, piece["columns"])
    if STORE.is_whole(queue, piece["chunk_id"], offsets):
        return to_serialize(OutOfBand(batch))
    return to_serialize(batch)  # a part: Arrow IPC writes just the slice's bytes


class OutOfBand:
    """Ships a whole RecordBatch by pickle protocol 5, buffers out of band: no copy.

    Dask's own Arrow serializer writes an IPC stream into a growing buffer first, a
    copy slower than loopback TCP. A wrapper with no Dask serializer goes the pickle
    route, where Arrow hands its buffers over by reference. Only for whole chunks:
    a slice would ship its parent's full buffers.
    """

    __slots__ = ("batch",)

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch

    def __reduce__(self):
        return (OutOfBand, (self.batch,))


def _store(queue: str, chunk_id: int, batch) -> None:
    STORE.put(queue, chunk_id, batch.batch if isinstance(batch, OutOfBand) else batch)


def _drop(queue: str, chunk_ids: list[int]) -> int:
    return STORE.drop(queue, chunk_ids)


async def install(client) -> None:
    """Register the scheduler extension and the worker handlers, each unless already there.

    A scheduler started with `--preload asyncflow.runtime.queue.extension` has the
    extension but no worker plugin yet: registering it reaches every current and future
    worker.
    """
    has_extension, has_handlers = await client.run_on_scheduler(_installed)
    if not has_extension:
        await client.register_plugin(TransferQueueSchedulerPlugin())
    if not has_handlers:
        await client.register_plugin(TransferQueueWorkerPlugin())


def _installed(dask_scheduler) -> tuple[bool, bool]:
    return (
        EXTENSION in dask_scheduler.extensions,
        TransferQueueWorkerPlugin.name in dask_scheduler.worker_plugins,
    )


class DistributedTransferQueue:
    def __init__(
        self,
        name: str | None = None,
        client=None,
        *,
        length_columns: Sequence[str] = DEFAULT_LENGTH_COLUMNS,
        capacity_rows: int | None = None,
        consumers: Sequence[str] | None = None,
        create: bool = True,
    ) -> None:
        self.name = name or f"asyncflow-tq-{secrets.token_hex(4)}"
        self.length_columns = tuple(length_columns)
        self.capacity_rows = capacity_rows
        self._consumers = None if consumers is None else list(consumers)
        self._client = client
        self._round_robin = None
        # On an asynchronous client this is a coroutine, awaited by `await queue`.
        self._started = self._sync(self._create) if create else None

    async def _create(self) -> None:
        await install(self.client)
        await self.client.scheduler.tq_create(
            name=self.name, capacity_rows=self.capacity_rows, consumers=self._consumers
        )

    def __await__(self):
        async def started():
            if self._started is not None and hasattr(self._started, "__await__"):
                await self._started
            return self

        return started().__await__()

    def __reduce__(self):
        return (_rebind, (self.name, self.length_columns, self.capacity_rows))

    @property
    def client(self):
        if self._client is None:
            self._client = _current_client()
        return self._client

    def _sync(self, coro_fn, *args, **kwargs):
        """Run now from synchronous code; return an awaitable on an asynchronous client."""
        return self.client.sync(coro_fn, *args, **kwargs)

    # ---- writes -----------------------------------------------------------------------

    def add_rows(self, partition: Hashable, batch: pa.RecordBatch | pa.Table, *, timeout=None):
        """Append rows; returns their sample ids (np.ndarray[int64]).

        With a capacity, first waits (up to `timeout` s, None = as long as it takes) for
        room, so producers slow down instead of the queue growing: QueueFull on timeout.
        """
        return self._sync(self._add_rows, partition, batch, timeout)

    async def _add_rows(self, partition, batch, timeout) -> np.ndarray:
        context = f"add_rows to queue {self.name!r} partition {partition!r}"
        batch = _as_batch(batch, context)
        if SAMPLE_ID in batch.schema.names:
            raise QueueError(f"{context}: sample ids are assigned by the queue; drop {SAMPLE_ID!r}")
        types, meta = _column_types(batch, context), _row_meta(batch, self.length_columns, context)
        reserved = self.capacity_rows is not None
        if reserved:
            await self.client.scheduler.tq_reserve(
                name=self.name,
                partition=partition,
                rows=batch.num_rows,
                types=pack_types(types),
                timeout=timeout,
            )
        try:
            chunk_id, address = await self._store(batch)
        except BaseException:
            if reserved:
                await self.client.scheduler.tq_unreserve(name=self.name, rows=batch.num_rows)
            raise
        try:
            ids = await self.client.scheduler.tq_add_rows(
                reserved=reserved,
                name=self.name,
                partition=partition,
                chunk_id=chunk_id,
                address=address,
                rows=batch.num_rows,
                nbytes=batch.nbytes,
                types=pack_types(types),
                meta=pack_meta(meta),
            )
        except BaseException:
            await self._unstore(chunk_id, address)
            raise
        return unpack(ids)

    def put(self, partition, sample_ids, batch, *, producer: str | None = None) -> None:
        """Write new columns for existing rows; visible together once committed."""
        return self._sync(self._put, partition, sample_ids, batch, producer)

    async def _put(self, partition, sample_ids, batch, producer) -> None:
        context = f"put to queue {self.name!r} partition {partition!r}"
        batch = _as_batch(batch, context)
        ids = _as_ids(sample_ids, context)
        if batch.num_rows != len(ids):
            raise QueueError(f"{context}: batch has {batch.num_rows} rows for {len(ids)} ids")
        batch = _without_echoed_ids(batch, ids, context)
        types, meta = _column_types(batch, context), _row_meta(batch, self.length_columns, context)
        chunk_id, address = await self._store(batch)
        try:
            await self.client.scheduler.tq_put(
                name=self.name,
                partition=partition,
                sample_ids=pack(ids),
                chunk_id=chunk_id,
                address=address,
                nbytes=batch.nbytes,
                types=pack_types(types),
                meta=pack_meta(meta),
                producer=producer,
            )
        except BaseException:
            await self._unstore(chunk_id, address)
            raise

    async def _store(self, batch: pa.RecordBatch) -> tuple[int, str]:
        """Keep the data here if we are a worker; otherwise hand it to a worker."""
        chunk_id = secrets.randbits(62)
        local = _local_address()
        if local is not None:
            STORE.put(self.name, chunk_id, batch)
            return chunk_id, local
        address = await self._next_worker()
        await self.client.rpc(address).tq_store(
            queue=self.name, chunk_id=chunk_id, batch=to_serialize(OutOfBand(batch))
        )
        return chunk_id, address

    async def _unstore(self, chunk_id: int, address: str) -> None:
        if address == _local_address():
            STORE.drop(self.name, [chunk_id])
        else:
            await self.client.rpc(address).tq_drop(queue=self.name, chunk_ids=[chunk_id])

    async def _next_worker(self) -> str:
        if self._round_robin is None:
            info = await self.client.scheduler.identity()
            workers = sorted(info["workers"])
            if not workers:
                raise QueueError(f"queue {self.name!r}: no workers to hold data put by a client")
            self._round_robin = itertools.cycle(workers)
        return next(self._round_robin)

    # ---- consumption ------------------------------------------------------------------

    def get(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        *,
        batch_size: int | None = None,
        sampler: str = "sequential",
        max_tokens: int | None = None,
        timeout: float | None = 0.0,
        min_rows: int = 1,
        max_staleness: int | None = None,
        lease_timeout: float | None = None,
    ) -> Lease | None:
        """Lease ready rows for `task`, waiting up to `timeout` s (None: forever) for them.

        `sampler` is a name: sequential, group_preserving or token_budget (with
        `max_tokens`). `max_staleness` skips rows more than that many policy versions old.
        """
        spec = self._spec(
            task,
            columns,
            partition,
            batch_size,
            sampler,
            max_tokens,
            min_rows,
            max_staleness,
            lease_timeout,
        )
        return self._sync(self._get, spec, timeout, single=True)

    def get_group(
        self,
        task: str,
        columns: Sequence[str],
        partition: Hashable,
        *,
        ranks: int,
        balance: str | None = "karmarkar_karp",
        same_view: bool = False,
        batch_size: int | None = None,
        sampler: str = "sequential",
        max_tokens: int | None = None,
        timeout: float | None = 0.0,
        min_rows: int = 1,
        max_staleness: int | None = None,
        lease_timeout: float | None = None,
    ) -> list[Lease] | None:
        """One micro-batch for a data-parallel group: a lease per rank, token-balanced
        (whole groups kept together), or the same rows for every rank with `same_view`."""
        spec = self._spec(
            task,
            columns,
            partition,
            batch_size,
            sampler,
            max_tokens,
            min_rows,
            max_staleness,
            lease_timeout,
        )
        spec.update(ranks=ranks, balance=balance, same_view=same_view)
        return self._sync(self._get, spec, timeout, single=False)

    def _spec(
        self,
        task,
        columns,
        partition,
        batch_size,
        sampler,
        max_tokens,
        min_rows,
        max_staleness,
        lease_timeout,
    ) -> dict:
        return {
            "task": task,
            "columns": _requested_columns(columns, f"get for task {task!r}"),
            "partition": partition,
            "batch_size": batch_size,
            "sampler": getattr(sampler, "__name__", sampler),
            "max_tokens": max_tokens,
            "min_rows": min_rows,
            "max_staleness": max_staleness,
            "lease_timeout": lease_timeout,
        }

    async def _get(self, spec: dict, timeout: float | None, single: bool):
        spec = {**spec, "owner": self._owner()}
        # Fast path: rows usually are ready; ask together with this process's other consumers.
        grants = await self._control({"op": "get", **spec})
        if grants is None and timeout != 0:  # then wait, event-driven, on the scheduler
            grants = await self.client.scheduler.tq_get(name=self.name, timeout=timeout, **spec)
        if grants is None:
            return None
        leases = []
        try:
            for grant in grants:
                ids = unpack(grant["sample_ids"])
                batch = await self._assemble(ids, spec["columns"], grant["plan"])
                leases.append(Lease(grant["lease_id"], spec["task"], spec["partition"], ids, batch))
        except BaseException:
            for grant in grants:
                await self._control({"op": "release", "lease_id": grant["lease_id"]})
            raise
        return leases[0] if single else leases

    def ack(self, lease: Lease | int, *, wait: bool = True) -> None:
        """The lease's outputs are stored: its rows are consumed by its task for good.

        `wait=False` returns at once: the ack rides with this process's next queue request
        (or goes alone within a few ms), and a failure is logged instead of raised. Requests
        keep their order, so this process's next get already sees the rows consumed.
        """
        request = {"op": "ack", "lease_id": _lease_id(lease)}
        if wait:
            return self._sync(self._control, request)
        return self._sync(self._defer, request)

    async def _defer(self, request: dict) -> None:
        future = self._scheduler_messages().defer(request)
        future.add_done_callback(partial(_log_failure, self.name, request))

    def release(self, lease: Lease | int) -> None:
        """The consumer failed: its rows go back to the task."""
        return self._sync(self._control, {"op": "release", "lease_id": _lease_id(lease)})

    async def _control(self, request: dict):
        return await self._scheduler_messages().call(request)

    def _scheduler_messages(self) -> Coalescer:
        """This process's coalescer of control requests for this queue (one per loop)."""

        async def send(requests: list[dict]) -> list[dict]:
            return await self.client.scheduler.tq_batch(name=self.name, requests=requests)

        return _coalescer(("scheduler", self.name), send)

    # ---- reads ------------------------------------------------------------------------

    def gather(self, partition, columns: Sequence[str], sample_ids=None) -> pa.Table:
        return self._sync(self._gather, partition, columns, sample_ids)

    async def _gather(self, partition, columns, sample_ids) -> pa.Table:
        context = f"gather from queue {self.name!r} partition {partition!r}"
        cols = _requested_columns(columns, context)
        ids = None if sample_ids is None else pack(_as_ids(sample_ids, context))
        reply = await self.client.scheduler.tq_gather(
            name=self.name, partition=partition, columns=cols, sample_ids=ids
        )
        batch = await self._assemble(unpack(reply["sample_ids"]), cols, reply["plan"])
        return pa.Table.from_batches([batch])

    async def _assemble(self, ids: np.ndarray, columns: list[str], plan: list[dict]):
        """Fetch every piece (one request per holder, all holders at once), then reorder."""
        by_address: dict[str, list[dict]] = {}
        for piece in plan:
            by_address.setdefault(piece["address"], []).append(piece)
        local = _local_address()

        async def fetch(address: str, pieces: list[dict]) -> list[pa.RecordBatch]:
            if address == local:
                return [
                    STORE.take(self.name, p["chunk_id"], unpack(p["offsets"]), p["columns"])
                    for p in pieces
                ]

            async def send(requests: list[list[dict]]) -> list[dict]:
                return await self.client.rpc(address).tq_fetch(queue=self.name, requests=requests)

            try:
                shipped = await _coalescer((address, self.name), send).call(pieces)
                return [item.batch if isinstance(item, OutOfBand) else item for item in shipped]
            except OSError as exc:
                raise QueueError(
                    f"queue {self.name!r}: the worker {address} holding these rows is "
                    f"unreachable ({exc!r}); the lease is released for redelivery"
                ) from exc

        results = await asyncio.gather(*(fetch(a, p) for a, p in by_address.items()))
        parts: dict[str, list[tuple[np.ndarray, pa.Array]]] = {c: [] for c in columns}
        for pieces, batches in zip(by_address.values(), results, strict=True):
            for piece, batch in zip(pieces, batches, strict=True):
                rows = unpack(piece["rows"])
                for col in piece["columns"]:
                    parts[col].append((rows, batch.column(col)))
        arrays = [pa.array(ids, pa.int64())] + [_in_order(parts[c], len(ids)) for c in columns]
        return pa.RecordBatch.from_arrays(arrays, names=[SAMPLE_ID, *columns])

    # ---- housekeeping -----------------------------------------------------------------

    def clear(self, partition: Hashable) -> None:
        return self._sync(self.client.scheduler.tq_clear, name=self.name, partition=partition)

    def seal(self, partition: Hashable) -> None:
        """No more rows will be added: the last short batch may go, drained tasks stop."""
        return self._sync(self.client.scheduler.tq_seal, name=self.name, partition=partition)

    def set_policy_version(self, version: int) -> None:
        return self._sync(
            self.client.scheduler.tq_set_policy_version, name=self.name, version=version
        )

    def declare_consumers(self, partition: Hashable, tasks: Sequence[str]) -> None:
        """Rows every one of `tasks` acked are evicted and their chunks freed."""
        return self._sync(
            self.client.scheduler.tq_declare_consumers,
            name=self.name,
            partition=partition,
            tasks=list(tasks),
        )

    def evict(self, partition: Hashable, sample_ids) -> None:
        ids = pack(_as_ids(sample_ids, f"evict from queue {self.name!r}"))
        return self._sync(
            self.client.scheduler.tq_evict, name=self.name, partition=partition, sample_ids=ids
        )

    def stale(self, partition: Hashable, max_staleness: int) -> np.ndarray:
        return unpack(
            self._sync(
                self.client.scheduler.tq_stale,
                name=self.name,
                partition=partition,
                max_staleness=max_staleness,
            )
        )

    def is_drained(self, task: str, columns: Sequence[str], partition: Hashable) -> bool:
        return self._sync(
            self.client.scheduler.tq_is_drained,
            name=self.name,
            task=task,
            columns=list(columns),
            partition=partition,
        )

    def stats(self) -> dict[str, Any]:
        return self._sync(self.client.scheduler.tq_stats, name=self.name)

    def lost(self, partition: Hashable) -> np.ndarray:
        """Sample ids of rows whose data died with a worker (to be replaced by the source)."""
        data = self._sync(self.client.scheduler.tq_lost, name=self.name, partition=partition)
        return unpack(data) if isinstance(data, bytes) else data

    def close(self) -> None:
        """Drop the queue: metadata on the scheduler, chunks on every worker."""
        return self._sync(self.client.scheduler.tq_drop_queue, name=self.name)

    def _owner(self) -> str:
        return _local_address() or self.client.id


# event loop -> (destination, queue) -> Coalescer: one per process, shared by every handle
_COALESCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _coalescer(key: tuple[str, str], send) -> Coalescer:
    per_loop = _COALESCERS.setdefault(asyncio.get_running_loop(), {})
    coalescer = per_loop.get(key)
    if coalescer is None:
        coalescer = per_loop[key] = Coalescer(send)
    return coalescer


def _log_failure(queue: str, request: dict, future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("asyncflow: queue %r: %s failed: %s", queue, request, future.exception())


def _rebind(name: str, length_columns: tuple[str, ...], capacity_rows: int | None):
    return DistributedTransferQueue(
        name, length_columns=length_columns, capacity_rows=capacity_rows, create=False
    )


def _current_client():
    """The client of this task, or of this worker process when called from a user thread.

    `get_client()` only knows task threads; threads a task starts (e.g. a pool of
    consumers) fall back to the worker living in this process.
    """
    try:
        return get_client()
    except ValueError:
        worker = _process_worker()
        if worker is None:
            raise
        return worker._get_client()


def _process_worker():
    try:
        return get_worker()
    except ValueError:
        from distributed import Worker

        alive = [w for w in list(Worker._instances) if w.status.name == "running"]
        return alive[0] if len(alive) == 1 else None


def _local_address() -> str | None:
    worker = _process_worker()
    return None if worker is None else worker.address


def _in_order(pieces: list[tuple[np.ndarray, pa.Array]], n: int) -> pa.Array:
    """Arrays of lease rows `rows` each, merged into lease order (no copy if one piece)."""
    if len(pieces) == 1 and len(pieces[0][0]) == n and np.array_equal(pieces[0][0], np.arange(n)):
        return pieces[0][1]
    rows = np.concatenate([r for r, _ in pieces])
    merged = pa.concat_arrays([a for _, a in pieces])
    return merged.take(pa.array(np.argsort(rows, kind="stable"), pa.int64()))
