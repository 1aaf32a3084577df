"""Operator replicas on Dask workers: placement, liveness, and recreation after a loss.

A Dask actor dies with its worker and nothing restarts it, so this module does:
it places one `OperatorHost` actor per replica, watches which workers the
scheduler still knows, turns a call to a replica on a lost worker into
`ReplicaLost` (instead of a 30 s connect timeout), and recreates a lost replica
on a live worker. What state the new replica needs (published weights, a
trainer snapshot) is the executor's business: it knows which version is current.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from distributed import Client, Future
from distributed.actor import ProxyRPC
from distributed.protocol import to_serialize

from asyncflow.errors import AsyncflowError
from asyncflow.graph import Node, WorkflowGraph
from asyncflow.operators.base import OperatorContext
from asyncflow.runtime.host import OperatorHost

_LOST_ERRORS = (OSError, EOFError, RuntimeError)  # CommClosedError is an OSError
# distributed raises a bare RuntimeError("Worker holding Actor was lost") for a call on an
# actor whose worker just died; only that message means "lost", other RuntimeErrors are real.
_LOST_MESSAGE = "Worker holding Actor was lost"


def _is_lost(exc: BaseException) -> bool:
    return not isinstance(exc, RuntimeError) or _LOST_MESSAGE in str(exc)


# `resources={"threads": N}` on a node sets its replicas' torch threads; every other key is
# a Dask worker resource (`dask worker --resources "GPU=1,train=1"`) the worker must offer.
THREADS = "threads"


def _bound(actor: Any, client: Client) -> Any:
    """The actor handle, calling through `client`.

    A deserialized `distributed.Actor` binds to the process's *default* client, i.e. the
    most recently created one: with a second client in the process (another cluster, a
    notebook's) its calls would go to a scheduler that has never heard of the actor and
    hang. There is no public way to choose, so set the two attributes `Actor` reads.
    """
    if getattr(actor, "_client", client) is not client:
        actor._client = client
        actor._future = Future(actor.key, client)
    return actor


class ReplicaLost(AsyncflowError):
    """The worker holding a replica is gone; the replica's in-flight work is lost."""

    def __init__(self, operator: str, replica: int, worker: str, cause: str = ""):
        self.operator, self.replica, self.worker, self.cause = operator, replica, worker, cause
        detail = f": {cause}" if cause else ""
        super().__init__(
            f"operator {operator!r} replica {replica} lost with worker {worker}{detail}"
        )

    def __reduce__(self):
        return (type(self), (self.operator, self.replica, self.worker, self.cause))


@dataclass
class Replica:
    """One placed replica: which operator, which index, which actor on which worker."""

    operator: str
    index: int
    actor: Any  # distributed.Actor proxy of an OperatorHost
    worker: str
    version: int | None = None  # weight version it holds, when it has weights
    generation: int = 0  # how many times it was recreated


class Call(concurrent.futures.Future):
    """An actor call in flight (`ReplicaPool.submit`): a plain `concurrent.futures.Future`
    that also records when its last method was sent (`started`, wall clock)."""

    started: float = 0.0


class ReplicaPool:
    """All replicas of a workflow, keyed by operator name.

    Calls (`submit`, `call`, `call_all`) go straight from the client to the replica's
    worker (`actor_execute`), one coroutine on the client's event loop each, and complete
    a `Call` future: nothing polls, no thread waits per call, and done-callbacks may be
    used. `distributed.Actor`'s own methods would route every call through the scheduler
    when the client was not made with `direct_to_workers=True` (the default): twice the
    messages, and with an embedded cluster the scheduler shares the driver's process.
    A client that says `direct_to_workers=False`, or that cannot reach a worker, keeps
    going through the scheduler.
    """

    def __init__(
        self,
        client: Client,
        graph: WorkflowGraph,
        *,
        seed: int,
        run_dir,
        torch_threads: int = 1,
        token: str = "",
        poll_seconds: float = 0.5,
    ):
        self.client = client
        self.graph = graph
        self.seed = seed
        self.run_dir = run_dir
        self.torch_threads = torch_threads
        self.token = token
        self.replicas: dict[str, list[Replica]] = {}
        self._live: set[str] = set(self._workers())
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._direct = client.direct_to_workers
        self._inflight: dict[str, set[Call]] = {}  # worker -> calls in flight to it

    # -- placement ------------------------------------------------------------------------

    def place_all(self, spread: Iterable[str] = (), dedicated: Iterable[str] = ()) -> str:
        """One actor per replica, round-robin over the workers able to run it; returns a
        one-line description of where everything went.

        Operators named in `spread` (data-parallel trainers: one process-group rank per
        process) get each replica on a different worker, and fail early if there are
        fewer workers than replicas. Operators named in `dedicated` (disaggregated
        placement, e.g. trainers) share workers of their own that nothing else uses, so
        a rollout never competes with a trainer for a process (and its GIL); if the
        cluster is too small for that, everything is colocated.
        """
        spread, dedicated = set(spread), set(dedicated)
        workers = self._workers()
        need = max((self.graph.nodes[n].replicas for n in dedicated), default=0)
        own, rest = (workers[:need], workers[need:]) if 0 < need < len(workers) else ([], [])
        cursor = 0  # consecutive replicas land on consecutive (so distinct) workers
        pending = []
        for name in self.graph.order():
            node = self.graph.nodes[name]
            candidates = self._candidates(node)
            pool = own if name in dedicated else rest
            candidates = [w for w in candidates if w in pool] or candidates
            if name in spread and node.replicas > len(candidates):
                raise AsyncflowError(
                    f"operator {name!r}: {node.replicas} data-parallel replicas need as many "
                    f"worker processes, the cluster has {len(candidates)}"
                )
            for index in range(node.replicas):
                worker = candidates[(cursor + index) % len(candidates)]
                pending.append((node, index, worker, self._submit(node, index, worker, 0)))
            cursor += node.replicas
        for node, index, worker, future in pending:
            actor = _bound(future.result(), self.client)
            self.replicas.setdefault(node.name, []).append(Replica(node.name, index, actor, worker))
        if self._direct is None:
            self._direct = all(self._reachable(w) for w in {w for _, _, w, _ in pending})
        self._monitor = threading.Thread(target=self._watch, name="asyncflow-liveness", daemon=True)
        self._monitor.start()
        return self.describe_placement(colocated=dedicated and not own)

    def describe_placement(self, colocated: bool = False) -> str:
        by_worker: dict[str, list[str]] = {}
        for name, replicas in self.replicas.items():
            for r in replicas:
                label = name if len(replicas) == 1 else f"{name}[{r.index}]"
                by_worker.setdefault(r.worker, []).append(label)
        parts = [
            f"{w.rsplit(':', 1)[-1]}: {', '.join(ops)}" for w, ops in sorted(by_worker.items())
        ]
        note = " (too few workers to disaggregate: colocated)" if colocated else ""
        return "placement: " + " | ".join(parts) + note

    def _submit(self, node: Node, index: int, worker: str, generation: int):
        ctx = OperatorContext(
            name=node.name,
            replica=index,
            num_replicas=node.replicas,
            seed=self.seed * 1000 + index,
            run_dir=self.run_dir,
            worker=worker,
            run_seed=self.seed,
        )
        threads = int(node.resources.get(THREADS, self.torch_threads))
        return self.client.submit(
            OperatorHost,
            node.operator,
            ctx,
            threads,
            actor=True,
            workers=[worker],
            allow_other_workers=False,
            key=f"asyncflow-{node.name}-{index}-g{generation}-{self.token}",
        )

    def _candidates(self, node: Node) -> list[str]:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        need = {k: v for k, v in node.resources.items() if k != THREADS}
        ok = [
            address
            for address, w in sorted(info.items())
            if all(w.get("resources", {}).get(k, 0) >= v for k, v in need.items())
        ]
        if not ok:
            raise AsyncflowError(
                f"operator {node.name!r} needs resources {need}; no worker offers them "
                f"(start workers with e.g. `dask worker --resources GPU=1`)"
            )
        return ok

    def _reachable(self, worker: str, timeout: float = 3.0) -> bool:
        """Can this process talk to `worker` directly (not only through the scheduler)?"""

        async def probe() -> None:
            await self.client.rpc(worker).identity()

        try:
            self.client.sync(probe, callback_timeout=timeout)
        except Exception:
            return False
        return True

    # -- liveness -------------------------------------------------------------------------

    def _workers(self) -> list[str]:
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                live = set(self._workers())
            except Exception:  # the client is closing
                return
            with self._lock:
                self._live = live
            self._fail_lost()

    def _fail_lost(self) -> None:
        """Calls in flight to workers that are gone end with `ReplicaLost` now."""
        with self._lock:
            gone = [w for w in self._inflight if w not in self._live]
            calls = [(w, c) for w in gone for c in self._inflight.pop(w)]
        for worker, call in calls:
            replica = getattr(call, "replica", None)
            if replica is not None and not call.done():
                _settle(call, exc=ReplicaLost(replica.operator, replica.index, worker))

    def is_live(self, replica: Replica) -> bool:
        with self._lock:
            return replica.worker in self._live

    def mark_lost(self, worker: str) -> None:
        with self._lock:
            self._live.discard(worker)
        self._fail_lost()

    def close(self) -> None:
        self._stop.set()

    def wait(self, replica: Replica, future: Any) -> Any:
        """The result of an actor call, or `ReplicaLost` as soon as its worker is gone.

        `future` is a `Call` (from `submit`) or a `distributed` actor future."""
        if isinstance(future, concurrent.futures.Future):
            return future.result()
        while True:
            if not self.is_live(replica):
                raise ReplicaLost(replica.operator, replica.index, replica.worker)
            try:
                return future.result(timeout=self._poll_seconds)
            except TimeoutError:
                continue
            except _LOST_ERRORS as exc:
                if not _is_lost(exc):
                    raise
                self.mark_lost(replica.worker)
                raise ReplicaLost(
                    replica.operator, replica.index, replica.worker, repr(exc)
                ) from exc

    def submit(self, replica: Replica, method: str, *args: Any, before=()) -> Call:
        """Start `method(*args)` on the replica; returns at once.

        `before`: (method, args) pairs called first, one after the other (each waits for
        the previous, so a weight load lands before the micro-batch it is for). The
        `Call` ends with the last method's result, its error (an `OperatorError` as
        raised on the worker), or `ReplicaLost` when the worker is or becomes gone.
        """
        call = Call()
        call.replica = replica  # type: ignore[attr-defined]
        worker = replica.worker
        if not self.is_live(replica):
            _settle(call, exc=ReplicaLost(replica.operator, replica.index, worker))
            return call
        with self._lock:
            self._inflight.setdefault(worker, set()).add(call)
        steps = [*before, (method, args)]
        key = replica.actor.key
        rpc = self.client.rpc(worker) if self._direct else ProxyRPC(self.client.scheduler, worker)

        async def run() -> None:
            try:
                result = None
                for name, call_args in steps:
                    call.started = time.time()
                    answer = await rpc.actor_execute(
                        function=name,
                        actor=key,
                        args=[to_serialize(a) for a in call_args],
                        kwargs={},
                    )
                    if answer["status"] != "OK":
                        raise answer["exception"]
                    result = answer["result"]
            except _LOST_ERRORS as exc:
                if not _is_lost(exc):
                    _settle(call, exc=exc)
                    return
                self.mark_lost(worker)
                lost = ReplicaLost(replica.operator, replica.index, worker, repr(exc))
                _settle(call, exc=lost)
            except BaseException as exc:  # handed to whoever waits
                _settle(call, exc=exc)
            else:
                _settle(call, result=result)
            finally:
                with self._lock:
                    calls = self._inflight.get(worker)
                    if calls is not None:
                        calls.discard(call)

        try:
            asyncio.run_coroutine_threadsafe(run(), self.client.loop.asyncio_loop)
        except RuntimeError as exc:  # the loop is closed: the client is gone
            _settle(call, exc=exc)
        return call

    def call(self, replica: Replica, method: str, *args: Any) -> Any:
        return self.submit(replica, method, *args).result()

    def call_all(self, replicas: list[Replica], method: str, *args: Any) -> list[Any]:
        """Call every replica at once (collectives need all ranks inside), then wait for all."""
        for replica in replicas:
            if not self.is_live(replica):
                raise ReplicaLost(replica.operator, replica.index, replica.worker)
        calls = [self.submit(replica, method, *args) for replica in replicas]
        return [call.result() for call in calls]

    # -- recovery -------------------------------------------------------------------------

    def recreate(
        self, replica: Replica, *, avoid: Iterable[str] = (), timeout: float = 120.0
    ) -> Replica:
        """A new actor for a lost replica, on a live worker (waits for the nanny's restart)."""
        node = self.graph.nodes[replica.operator]
        avoid = set(avoid)
        deadline = time.monotonic() + timeout
        while True:
            live = set(self._workers())  # not under the lock: calls finish on the loop
            with self._lock:
                self._live = live
            self._fail_lost()
            candidates = [w for w in self._candidates(node) if w not in avoid]
            if candidates:
                break
            if time.monotonic() > deadline:
                raise AsyncflowError(
                    f"operator {replica.operator!r} replica {replica.index}: no live worker to "
                    f"recreate it on after {timeout:.0f}s"
                )
            time.sleep(self._poll_seconds)
        load = {w: 0 for w in candidates}
        for replicas in self.replicas.values():
            for other in replicas:
                if other.worker in load:
                    load[other.worker] += 1
        worker = min(candidates, key=lambda w: (load[w], w))
        generation = replica.generation + 1
        actor = _bound(self._submit(node, replica.index, worker, generation).result(), self.client)
        new = Replica(replica.operator, replica.index, actor, worker, None, generation)
        self.replicas[replica.operator][replica.index] = new
        return new


def _settle(call: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None):
    """Complete `call` unless something (the liveness monitor) already did."""
    try:
        if exc is not None:
            call.set_exception(exc)
        else:
            call.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
