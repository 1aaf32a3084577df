"""The async streaming executor: micro-batches flow through the graph as soon as ready.

Every operator gets a dispatcher that leases ready micro-batches from the
TransferQueue and hands them to whichever of its replicas is idle; outputs go
back to the queue and wake the operators that read them. Nothing waits for a
whole stage. Trainers take the rows of step k in any order as they arrive,
step the optimizer once all of them are in, and publish the new weights.

Bounded staleness (`max_staleness` = s): the source adds step k's rows only
once the trainers finished step k - s - 1, and a replica whose weights come
from a trainer (rollout) loads the newest published version between two
micro-batches (a delayed parameter update: never mid-generation) and takes rows
of step k only if its version is at least k - s. So every sample is trained by
a policy at most s versions newer than the one that generated it; s = 0 is
on-policy, with streaming inside the step; s = 1 lets the rollout of step k+1
overlap the training of step k.

Failures: the queue's rows live here, on the driver, so a lost worker loses
only work in flight. A lost replica's lease is released (its rows go to another
replica), and the replica is recreated on a live worker with the published
weights. A lost trainer rank loses the half-accumulated step: every rank goes
back to the snapshot taken after the previous step and the step's rows are
trained again, so each sample is trained on exactly once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from asyncflow.errors import AsyncflowError, QueueError
from asyncflow.graph import Node
from asyncflow.runtime.events import Dispatch
from asyncflow.runtime.executor import Executor, RunResult, _has_end_step, _with_ids
from asyncflow.runtime.queue import Lease, samplers
from asyncflow.runtime.replicas import Call, Replica, ReplicaLost

_WAKE_SECONDS = 1.0  # waits also wake this often to notice a failure or shutdown


class Signal:
    """A change counter one can wait on without missing a wake-up between look and wait.

    `fresh[step]` counts the changes that may have made rows of that step available
    (`bump(step)`): a reader that found nothing in a step need not ask the queue again
    until that count moved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.count = 0
        self.fresh: dict[int, int] = {}

    def bump(self, step: int | None = None) -> None:
        with self._cond:
            self.count += 1
            if step is not None:
                self.fresh[step] = self.fresh.get(step, 0) + 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float = _WAKE_SECONDS) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.count != seen, timeout)


class _Stopped(Exception):
    """The run is stopping (another thread failed); leave quietly."""


@dataclass
class _Flight:
    """A micro-batch in flight on one replica (an actor call that has not come back)."""

    index: int  # replica index
    replica: Replica
    lease: Lease
    step: int
    call: Call
    loads: int | None = None  # weight version loaded just before it, if any


class AsyncExecutor(Executor):
    mode = "async"

    def __init__(self, *args: Any, max_staleness: int = 1, **kwargs: Any):
        if max_staleness < 0:
            raise AsyncflowError(f"max_staleness must be >= 0, got {max_staleness}")
        super().__init__(*args, max_staleness=max_staleness, **kwargs)
        self._changed = Signal()  # source, trainers' step loop, step completion
        # one per operator: its dispatcher wakes only for what concerns it (its own calls
        # coming back, new rows of its inputs, a step opened or retired, new weights)
        self._signals: dict[str, Signal] = {}
        self._consumers: dict[str, list[Signal]] = {}
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._open: list[int] = []  # steps whose rows are in the queue, oldest first
        self._rows: dict[int, int] = {}  # step -> rows the source added
        self._trained_through: dict[str, int] = {}  # trainer -> next step it will train
        self._step_metrics: dict[int, dict[str, float]] = {}
        self._trained: dict[str, dict[int, list[int]]] = {}

    # -- orchestration ------------------------------------------------------------------

    def _run_steps(self, first_step: int, result: RunResult) -> None:
        self._first, self._end = first_step, self.recipe.steps
        self._trained_through = {name: first_step for name in self.trainers}
        nodes = [self.graph.nodes[n] for n in self.graph.order()]
        self._signals = {n.name: Signal() for n in nodes if not n.is_source}
        self._consumers = {
            n.name: [
                self._signals[c.name]
                for c in nodes
                if not c.is_source and set(c.reads) & set(n.writes)
            ]
            for n in nodes
        }
        # step index minus weight version, per trainer (0 unless versions started elsewhere)
        self._offset = {
            name: first_step - int(self.step_snapshots[name][first_step - 1][1]["version"])
            for name in self.trainers
        }
        threads = [threading.Thread(target=self._guard, args=(self._feed,), name="feed")]
        for name in self.graph.order():
            node = self.graph.nodes[name]
            if node.is_source:
                continue
            target = self._train_loop if name in self.trainers else self._dispatch_loop
            threads.append(
                threading.Thread(target=self._guard, args=(target, node), name=f"af-{name}")
            )
        for thread in threads:
            thread.daemon = True
            thread.start()
        try:
            self._finish_steps(result)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._stop.set()
            self._wake_all()
            for thread in threads:
                thread.join(timeout=30)
        if self._failure is not None:
            raise self._failure

    def _guard(self, loop, *args: Any) -> None:
        try:
            loop(*args)
        except _Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._failure is None and not isinstance(exc, _Stopped):
                self._failure = exc
        self._stop.set()
        self._wake_all()

    def _wake_all(self) -> None:
        """Something every loop may care about changed (a step, weights, the run's end)."""
        self._changed.bump()
        for signal in self._signals.values():
            signal.bump()

    def _wait(self, ready) -> None:
        """Block until `ready()` holds; raise _Stopped if the run is stopping."""
        while True:
            seen = self._changed.count
            if self._stop.is_set():
                raise _Stopped
            if ready():
                return
            self._changed.wait(seen)

    # -- source -------------------------------------------------------------------------

    def _feed(self) -> None:
        (source_name,) = [n for n in self.graph.order() if self.graph.nodes[n].is_source]
        for step in range(self._first, self._end):
            # step k may start once every trainer finished step k - s - 1
            self._wait(lambda step=step: step <= self._slowest_trainer() + self.max_staleness)
            batch = self._call_with_recovery(
                source_name, 0, "produce", step, self.recipe.rows_per_step
            )
            ids = self.queue.add_rows(step, batch)
            self.queue.seal(step)
            with self._lock:
                self.step_first_id[step] = int(ids[0]) if len(ids) else self.queue.next_sample_id
                self._rows[step] = len(ids)
                self._open.append(step)
            self.observers.rows_added(step, _with_ids(batch, ids))
            self._wake_all()

    def _slowest_trainer(self) -> int:
        return min(self._trained_through.values(), default=self._end)

    def _call_with_recovery(self, name: str, index: int, method: str, *args: Any) -> Any:
        while True:
            replica = self.pool.replicas[name][index]
            try:
                return self.pool.call(replica, method, *args)
            except ReplicaLost as exc:
                self._recover(replica, exc.cause or "worker gone")

    # -- ordinary operators -------------------------------------------------------------

    def _dispatch_loop(self, node: Node) -> None:
        """Hand ready micro-batches to idle replicas until every step is done.

        One thread per operator does all of it: calls are sent without blocking and
        come back through done-callbacks that only queue the finished call and wake this
        thread, which stores the outputs, acks, and sends the replica its next lease."""
        wake = self._signals[node.name]
        idle: deque[int] = deque(range(len(self.pool.replicas[node.name])))
        flights: dict[int, _Flight] = {}
        finished: deque[_Flight] = deque()
        tried: dict[int, int] = {}
        while True:
            seen = wake.count
            try:
                while finished:
                    self._complete(node, finished.popleft(), flights, idle, tried)
                if self._stop.is_set():
                    # micro-batches in flight finish and are stored: a failure elsewhere
                    # loses no work
                    if not flights:
                        raise _Stopped
                elif self._all_done():
                    return
                else:
                    through = self._eligible_through(node)
                    while idle:
                        found = self._lease(node, through, tried)
                        if found is None:
                            break
                        self._send(node, idle.popleft(), *found, flights, finished)
            except _Stopped:
                raise
            except BaseException as exc:
                self._fail(exc)
                continue
            wake.wait(seen)

    def _send(self, node, index, lease, step, flights, finished) -> None:
        """Start one micro-batch on replica `index`, after a weight load if one is due
        (delayed parameter update: the newest published weights, between micro-batches)."""
        replica = self.pool.replicas[node.name][index]
        before, loads = (), None
        source = self.sync_source.get(node.name)
        if source is not None:
            version, weights = self.published[source]
            if replica.version is None or replica.version < version:
                before, loads = (("set_weights", (version, weights)),), version
        try:
            call = self.pool.submit(replica, "process", lease.batch, before=before)
        except BaseException:
            self.queue.release(lease)
            raise
        flight = _Flight(index, replica, lease, step, call, loads)
        flights[index] = flight
        wake = self._signals[node.name]

        def done(_call, flight=flight) -> None:  # on the client's event loop: no work here
            finished.append(flight)
            wake.bump()

        call.add_done_callback(done)

    def _complete(self, node, flight: _Flight, flights: dict, idle: deque, tried: dict) -> None:
        """A call came back: store its outputs and ack, or give its rows back."""
        del flights[flight.index]
        replica, lease, step = flight.replica, flight.lease, flight.step
        try:
            output, busy = flight.call.result()
        except ReplicaLost as exc:
            self.queue.release(lease)
            tried.pop(step, None)  # its rows are on offer again
            self._recover_in_background(node, replica, exc.cause or "worker gone", idle)
            return
        except BaseException:
            self.queue.release(lease)
            idle.append(flight.index)
            raise
        try:
            if flight.loads is not None:
                replica.version = flight.loads
                self.observers.weights_loaded(replica.operator, replica.index, flight.loads)
            if output.num_columns:
                self.queue.put(step, lease.sample_ids, output, producer=node.name)
            self.queue.ack(lease)
            self._tell(node, replica, step, lease, output, flight.call.started, busy)
        finally:
            idle.append(flight.index)
            if output.num_columns:
                for signal in self._consumers[node.name]:
                    signal.bump(step)
            if self._slowest_trainer() > step:  # the step may be complete now
                self._changed.bump()

    def _recover_in_background(self, node: Node, replica: Replica, why: str, idle) -> None:
        """Recreate a lost replica without holding up the operator's other replicas."""

        def recover() -> None:
            try:
                self._recover(replica, why)
                idle.append(replica.index)
            except BaseException as exc:
                self._fail(exc)
            finally:
                self._signals[node.name].bump()

        threading.Thread(target=recover, name=f"af-recover-{node.name}", daemon=True).start()

    def _all_done(self) -> bool:
        return self._slowest_trainer() >= self._end and not self._open

    def _eligible_through(self, node: Node) -> int:
        """Newest step this operator may take rows of (its weights' staleness bound)."""
        source = self.sync_source.get(node.name)
        if source is None:
            return self._end
        return self.published[source][0] + self._offset[source] + self.max_staleness

    def _lease(
        self, node: Node, through: int, tried: dict[int, int] | None = None
    ) -> tuple[Lease, int] | None:
        """A lease of ready rows of the oldest open step (up to `through`) that has some.

        `tried` (step -> `Signal.fresh` count when the queue last had nothing for this
        operator there) skips the steps where nothing changed since: their answer would
        be None again, and each question costs the queue a scan of the step's rows."""
        sampler = samplers.group_preserving if node.operator.needs_whole_groups else None
        batch_size = None if sampler is not None else self.recipe.micro_batch_size
        fresh = self._signals[node.name].fresh
        with self._lock:
            steps = [k for k in self._open if k <= through]
        for step in steps:
            seen = fresh.get(step, 0)
            if tried is not None and tried.get(step) == seen:
                continue
            try:
                lease = self.queue.get(
                    node.name,
                    list(node.reads),
                    step,
                    batch_size=batch_size,
                    sampler=sampler or samplers.sequential,
                )
            except QueueError:
                with self._lock:
                    if step not in self._open:  # retired meanwhile
                        continue
                raise
            if lease is not None:
                return lease, step
            if tried is not None:
                tried[step] = seen
        return None

    def _tell(self, node, replica, step, lease, output, started, busy, attempt=0) -> None:
        self.observers.dispatched(
            Dispatch(
                node.name,
                replica.index,
                replica.worker,
                step,
                lease.sample_ids,
                lease.batch,
                output,
                started,
                time.time(),
                busy,
                replica.version,
                attempt,
            )
        )

    # -- trainers -----------------------------------------------------------------------

    def _train_loop(self, node: Node) -> None:
        for step in range(self._first, self._end):
            self._wait(lambda step=step: step in self._rows)
            attempt = 0
            while True:
                try:
                    metrics, ids = self._train_step(node, step, attempt)
                    break
                except ReplicaLost as exc:
                    self._restore_trainer(node.name, exc.cause or "worker gone")
                    attempt += 1
            self._snapshot(node.name, step)
            with self._lock:
                self._trained.setdefault(node.name, {})[step] = ids
                self._step_metrics.setdefault(step, {}).update(metrics)
                self._trained_through[node.name] = step + 1
            self._wake_all()

    def _train_step(self, node: Node, step: int, attempt: int) -> tuple[dict, list[int]]:
        """Feed step `step`'s rows to idle ranks as they become ready, then step them all.

        Leases stay un-acked until the optimizer stepped: if a rank is lost they are all
        released, and the step is trained again from the previous snapshot."""
        ranks = self.pool.replicas[node.name]
        wake = self._signals[node.name]
        idle: deque[int] = deque(range(len(ranks)))
        held: list[Lease] = []
        lost: list[ReplicaLost] = []
        flights: dict[int, _Flight] = {}
        finished: deque[_Flight] = deque()
        rows, expected = 0, self._rows[step]
        tried: dict[int, int] = {}

        def done(_call, flight) -> None:  # on the client's event loop: no work here
            finished.append(flight)
            wake.bump()

        try:
            while rows < expected or flights:
                seen = wake.count
                while finished:
                    flight = finished.popleft()
                    del flights[flight.index]
                    idle.append(flight.index)
                    try:
                        output, busy = flight.call.result()
                    except ReplicaLost as exc:
                        lost.append(exc)
                        continue
                    except BaseException as exc:
                        self._fail(exc)
                        continue
                    rows += flight.lease.batch.num_rows
                    self._tell(
                        node,
                        flight.replica,
                        step,
                        flight.lease,
                        output,
                        flight.call.started,
                        busy,
                        attempt,
                    )
                if self._stop.is_set():
                    raise _Stopped
                if lost and not flights:
                    raise lost[0]
                while idle and not lost:
                    found = self._lease(node, step, tried)
                    if found is None or found[1] != step:
                        break
                    lease, index = found[0], idle.popleft()
                    held.append(lease)
                    call = self.pool.submit(ranks[index], "process", lease.batch)
                    flight = _Flight(index, ranks[index], lease, step, call)
                    flights[index] = flight
                    call.add_done_callback(lambda c, f=flight: done(c, f))
                if rows >= expected and not flights:
                    break
                wake.wait(seen)
            if lost:
                raise lost[0]
            results = self.pool.call_all(ranks, "end_step", step)
        except BaseException:
            for lease in held:
                self.queue.release(lease)
            raise
        metrics: dict[str, float] = {}
        for replica, m in zip(ranks, results, strict=True):
            self.observers.step_ended(node.name, replica.index, step, m)
            metrics.update(m)
        for lease in held:
            self.queue.ack(lease)
        return metrics, sorted(int(i) for lease in held for i in lease.sample_ids)

    # -- step completion ----------------------------------------------------------------

    def _step_complete(self, step: int) -> bool:
        if any(self._trained_through[name] <= step for name in self.trainers):
            return False
        for name in self.graph.order():
            node = self.graph.nodes[name]
            if node.is_source or name in self.trainers:
                continue
            if not self.queue.is_drained(name, list(node.reads), step):
                return False
        return True

    def _finish_steps(self, result: RunResult) -> None:
        last = time.perf_counter()
        for step in range(self._first, self._end):
            self._wait(lambda step=step: step in self._rows and self._step_complete(step))
            rows = self.queue.gather(step, list(self.recipe.metric_columns))
            metrics = dict(self._step_metrics.pop(step, {}))
            for name in self.graph.order():
                node = self.graph.nodes[name]
                if (
                    name not in self.trainers
                    and not node.is_source
                    and _has_end_step(node.operator)
                ):
                    for m in self.pool.call_all(self.pool.replicas[name], "end_step", step):
                        metrics.update(m)
            with self._lock:
                self._open.remove(step)
                for name, per_step in self._trained.items():
                    result.trained.setdefault(name, {})[step] = per_step.pop(step)
            self.queue.clear(step)
            now = time.perf_counter()
            record = {
                "step": step,
                "samples": rows.num_rows,
                "step_time": now - last,
                "samples_per_s": rows.num_rows / max(now - last, 1e-9),
                "weight_version": self._version_after(self.recipe.trainer, step),
                **self.recipe.step_metrics(rows),
                **self._staleness(step, rows),
                **metrics,
            }
            last = now
            self._finish_step(record, result)
            self._wake_all()
