"""Operator replicas on Dask workers: placement, liveness, and recreation after a loss.

A Dask actor dies with its worker and nothing restarts it, so this module does:
it places one `OperatorHost` actor per replica, watches which workers the
scheduler still knows, turns a call to a replica on a lost worker into
`ReplicaLost` (instead of a 30 s connect timeout), and recreates a lost replica
on a live worker. What state the new replica needs (published weights, a
trainer snapshot) is the executor's business: it knows which version is current.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from distributed import Client, Future

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


class ReplicaPool:
    """All replicas of a workflow, keyed by operator name."""

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

    def is_live(self, replica: Replica) -> bool:
        with self._lock:
            return replica.worker in self._live

    def mark_lost(self, worker: str) -> None:
        with self._lock:
            self._live.discard(worker)

    def close(self) -> None:
        self._stop.set()

    def wait(self, replica: Replica, future: Any) -> Any:
        """The result of an actor call, or `ReplicaLost` as soon as its worker is gone."""
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

    def call(self, replica: Replica, method: str, *args: Any) -> Any:
        if not self.is_live(replica):
            raise ReplicaLost(replica.operator, replica.index, replica.worker)
        try:
            future = getattr(replica.actor, method)(*args)
        except _LOST_ERRORS as exc:
            if not _is_lost(exc):
                raise
            self.mark_lost(replica.worker)
            raise ReplicaLost(replica.operator, replica.index, replica.worker, repr(exc)) from exc
        return self.wait(replica, future)

    def call_all(self, replicas: list[Replica], method: str, *args: Any) -> list[Any]:
        """Call every replica at once (collectives need all ranks inside), then wait for all."""
        futures = []
        for replica in replicas:
            if not self.is_live(replica):
                raise ReplicaLost(replica.operator, replica.index, replica.worker)
            futures.append(getattr(replica.actor, method)(*args))
        return [self.wait(r, f) for r, f in zip(replicas, futures, strict=True)]

    # -- recovery -------------------------------------------------------------------------

    def recreate(
        self, replica: Replica, *, avoid: Iterable[str] = (), timeout: float = 120.0
    ) -> Replica:
        """A new actor for a lost replica, on a live worker (waits for the nanny's restart)."""
        node = self.graph.nodes[replica.operator]
        avoid = set(avoid)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._live = set(self._workers())
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
