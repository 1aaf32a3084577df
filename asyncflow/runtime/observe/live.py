"""LiveState: the driver-side picture of a run, built from the executor's events.

Hooks are called from several executor threads at once; each takes one lock for a
few dictionary and deque operations (O(1) per event, plus a vectorised look at a
trainer micro-batch's sample ids for staleness). Everything that costs more (rates
over a window, queue occupancy, JSON) happens in `take_delta` / `snapshot`, called
by the publisher about once a second from its own thread.

`take_delta()` returns what the scheduler-side board needs: the current counters and
gauges (small) plus what was appended since the previous call (finished steps, new
timeline segments, recoveries), so every push stays small however long the run.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from asyncflow.runtime.events import Dispatch, RunInfo, RunObserver

# step-record keys that the page and the prometheus metrics use (records have many more)
STEP_KEYS = (
    "step",
    "samples",
    "step_time",
    "samples_per_s",
    "weight_version",
    "reward",
    "accuracy",
    "staleness/mean",
    "staleness/max",
)
TOKEN_COLUMN = "response_ids"  # generated tokens: the rollout's output
VERSION_COLUMN = "policy_version"  # the weight version a row was generated with
STALENESS_BINS = 16  # histogram bins 0..15 (the last also holds anything older)


def trains(operator: Any) -> bool:
    """Same rule as the executors: a weighted operator whose `trains` flag is set."""
    return bool(getattr(operator, "trains", False)) and bool(getattr(operator, "has_weights", 0))


def token_count(batch: pa.RecordBatch, column: str = TOKEN_COLUMN) -> int:
    """Tokens in a list column, from its offsets: O(1), no scan."""
    if column not in batch.schema.names:
        return 0
    array = batch.column(column)
    if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type):
        return 0
    if len(array) == 0:
        return 0
    offsets = array.offsets
    return int(offsets[len(array)].as_py() - offsets[0].as_py())


class StalenessTracker:
    """Versions behind the trainer that trained samples were generated with.

    Generators (operators writing `policy_version`, or any operator with weights synced
    from the trainer) record each sample's version; when the trainer takes a micro-batch,
    its lag is the trainer's published version (before this update) minus that.
    """

    def __init__(self) -> None:
        self.trainer: str | None = None
        self.generators: set[str] = set()
        self.published: dict[str, int] = {}
        self._versions: dict[int, dict[int, int]] = {}  # step -> sample id -> version

    def configure(self, info: RunInfo) -> None:
        """Take the trainer and its generators from the run's graph."""
        graph, trainer = info.graph, info.recipe.trainer
        self.trainer = trainer
        self.generators = {n for n, node in graph.nodes.items() if VERSION_COLUMN in node.writes}
        self.generators |= {target for source, target in graph.weight_syncs if source == trainer}

    def published_version(self, operator: str, version: int) -> None:
        self.published[operator] = int(version)

    def lags(self, d: Dispatch) -> np.ndarray | None:
        """Record a generator's versions, or return a trainer micro-batch's lags."""
        if d.operator in self.generators:
            if VERSION_COLUMN in d.outputs.schema.names:
                versions = d.outputs.column(VERSION_COLUMN).to_numpy(zero_copy_only=False)
            elif d.weight_version is not None:
                versions = np.full(len(d.sample_ids), d.weight_version)
            else:
                return None
            per_step = self._versions.setdefault(d.step, {})
            per_step.update(zip(d.sample_ids.tolist(), versions.tolist(), strict=False))
            return None
        if d.operator != self.trainer or self.trainer not in self.published:
            return None
        known = self._versions.get(d.step)
        if not known:
            return None
        versions = np.fromiter(
            (known.get(i, -1) for i in d.sample_ids.tolist()), np.int64, len(d.sample_ids)
        )
        versions = versions[versions >= 0]
        return self.published[self.trainer] - versions

    def forget(self, step: int) -> None:
        self._versions.pop(step, None)


def histogram(lags: np.ndarray) -> np.ndarray:
    return np.bincount(np.clip(lags, 0, STALENESS_BINS - 1), minlength=STALENESS_BINS)


class _Operator:
    __slots__ = (
        "busy",
        "consumed",
        "dispatches",
        "last_finished",
        "name",
        "produced",
        "redelivered",
        "replicas",
        "tokens",
        "window",
    )

    def __init__(self, name: str, replicas: int) -> None:
        self.name = name
        self.replicas = replicas
        self.dispatches = 0
        self.consumed = 0
        self.produced = 0
        self.tokens = 0
        self.busy = 0.0
        self.redelivered = 0
        self.last_finished = 0.0
        self.window: deque[tuple[float, int, int, float]] = deque()  # (t, rows, tokens, busy)


class LiveState(RunObserver):
    """Aggregates a run's events; `take_delta()` / `snapshot()` read it.

    window: seconds over which throughput and busy fractions are measured.
    max_segments: timeline segments kept for `snapshot()` (the board keeps its own).
    """

    def __init__(
        self,
        window: float = 10.0,
        max_segments: int = 4000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self.run_id = uuid.uuid4().hex[:12]
        self.info: RunInfo | None = None
        self.header: dict[str, Any] = {}
        self.status = "starting"
        self.started = clock()
        self.finished_at: float | None = None
        self.ops: dict[str, _Operator] = {}
        self._sources: list[str] = []
        self.loaded: dict[str, dict[int, int]] = {}  # operator -> replica -> weight version
        self.staleness = StalenessTracker()
        self.stale_hist = np.zeros(STALENESS_BINS, np.int64)  # all trained samples
        self.step_hist = np.zeros(STALENESS_BINS, np.int64)  # the current step's
        self.trained = 0
        self.tokens = 0
        self.recoveries = 0
        self.redelivered = 0  # rows handed out again after a failure
        self.redelivered_leases = 0
        self.steps_done = 0
        self.last_step: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.steps: list[dict[str, Any]] = []  # compact records, all of them
        self.segments: deque[list] = deque(maxlen=max_segments)
        self.messages: deque[str] = deque(maxlen=50)
        # appended since the last take_delta()
        self._new_steps: list[dict[str, Any]] = []
        self._new_segments: list[list] = []
        self._new_messages: list[str] = []

    # -- hooks (driver threads) ---------------------------------------------------------

    def run_started(self, info: RunInfo) -> None:
        graph, trainer = info.graph, info.recipe.trainer
        with self._lock:
            self.info = info
            self.started = self.clock()
            self.status = "running"
            for name in graph.order():
                self.ops.setdefault(name, _Operator(name, graph.nodes[name].replicas))
            self._sources = [n for n in graph.order() if graph.nodes[n].is_source]
            self.staleness.configure(info)
            self.header = {
                "run_id": self.run_id,
                "workflow": info.workflow_name or graph.name,
                "mode": info.mode,
                "run_dir": str(info.run_dir),
                "steps": info.recipe.steps,
                "first_step": info.first_step,
                "rows_per_step": info.recipe.rows_per_step,
                "max_staleness": info.max_staleness,
                "trainer": trainer,
                "trainers": [n for n in graph.order() if trains(graph.nodes[n].operator)],
                "order": list(graph.order()),
                "graph": graph.describe(),
                "dashboard": info.dashboard,
                "scheduler": info.scheduler,
                "started": self.started,
            }

    def rows_added(self, step: int, rows: pa.RecordBatch) -> None:
        now = self.clock()
        with self._lock:
            for name in self._sources:
                op = self.ops[name]
                op.produced += rows.num_rows
                op.dispatches += 1
                op.last_finished = now
                op.window.append((now, rows.num_rows, 0, 0.0))

    def dispatched(self, d: Dispatch) -> None:
        rows = d.inputs.num_rows
        produced = d.outputs.num_rows if d.outputs.num_columns else 0
        tokens = token_count(d.outputs)
        segment = [d.operator, d.replica, d.worker, d.step, rows, d.started, d.finished]
        segment.append(round(d.busy_seconds, 6))
        with self._lock:
            op = self.ops.get(d.operator)
            if op is None:
                op = self.ops[d.operator] = _Operator(d.operator, 1)
            op.dispatches += 1
            op.consumed += rows
            op.produced += produced
            op.tokens += tokens
            op.busy += d.busy_seconds
            op.last_finished = d.finished
            op.window.append((d.finished, rows, tokens, d.busy_seconds))
            self.tokens += tokens
            if d.attempt:
                op.redelivered += rows
                self.redelivered += rows
                self.redelivered_leases += 1
            if d.operator == self.staleness.trainer:
                self.trained += rows
            lags = self.staleness.lags(d)
            if lags is not None and len(lags):
                h = histogram(lags)
                self.stale_hist += h
                self.step_hist += h
            self.segments.append(segment)
            self._new_segments.append(segment)

    def weights_published(self, operator: str, version: int, weights: dict[str, Any]) -> None:
        with self._lock:
            self.staleness.published_version(operator, version)

    def weights_loaded(self, operator: str, replica: int, version: int) -> None:
        with self._lock:
            self.loaded.setdefault(operator, {})[replica] = int(version)

    def step_finished(self, record: dict[str, Any]) -> None:
        compact = {k: _num(record[k]) for k in STEP_KEYS if k in record}
        compact["time"] = self.clock()
        with self._lock:
            self.steps.append(compact)
            self._new_steps.append(compact)
            self.steps_done += 1
            self.last_step = compact
            self.staleness.forget(int(record["step"]))
            self.step_hist = np.zeros(STALENESS_BINS, np.int64)

    def recovered(self, message: str, operator: str | None = None) -> None:
        with self._lock:
            self.recoveries += 1
            self.messages.append(message)
            self._new_messages.append(message)

    def run_finished(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self.status = str(summary.get("status", "finished"))
            self.finished_at = self.clock()
            self.summary = {k: v for k, v in summary.items() if k != "after"}
            after = summary.get("after") or {}
            self.summary["after"] = {k: _num(v) for k, v in after.items()}

    # -- reading (publisher thread) -----------------------------------------------------

    def take_delta(self, queue_stats: dict | None = None) -> dict[str, Any]:
        """Current gauges and counters, plus what was appended since the last call."""
        with self._lock:
            out = self._gauges(queue_stats)
            out["new_steps"], self._new_steps = self._new_steps, []
            out["new_segments"], self._new_segments = self._new_segments, []
            out["new_messages"], self._new_messages = self._new_messages, []
        return out

    def give_back(self, delta: dict[str, Any]) -> None:
        """A push failed: its appended items go in front of the next delta."""
        with self._lock:
            self._new_steps[:0] = delta.get("new_steps", [])
            self._new_segments[:0] = delta.get("new_segments", [])
            self._new_messages[:0] = delta.get("new_messages", [])
            del self._new_segments[: -self.segments.maxlen]  # a long outage keeps the newest

    def snapshot(self, queue_stats: dict | None = None) -> dict[str, Any]:
        """Everything (for tests and local tools): header, gauges, all steps, segments."""
        with self._lock:
            out = self._gauges(queue_stats)
            out["header"] = dict(self.header)
            out["steps"] = list(self.steps)
            out["segments"] = list(self.segments)
            out["messages"] = list(self.messages)
        return out

    def queue_stats(self) -> dict | None:
        """The driver's queue counters (O(partitions x columns)), when the run started."""
        info = self.info
        return None if info is None else info.queue.stats()

    def _gauges(self, queue_stats: dict | None) -> dict[str, Any]:
        now = self.clock()
        end = self.finished_at or now
        elapsed = max(end - self.started, 1e-9)
        span = max(min(self.window, elapsed), 1e-9)
        leases = (queue_stats or {}).get("leases_by_task", {})
        operators = {}
        rate_tokens = 0.0
        for name, op in self.ops.items():
            while op.window and op.window[0][0] < now - self.window:
                op.window.popleft()
            rows = sum(w[1] for w in op.window)
            tokens = sum(w[2] for w in op.window)
            busy = sum(w[3] for w in op.window)
            rate_tokens += tokens / span
            in_flight = int(leases.get(name, 0))
            operators[name] = {
                "replicas": op.replicas,
                "dispatches": op.dispatches,
                "consumed": op.consumed,
                "produced": op.produced,
                "tokens": op.tokens,
                "busy_seconds": round(op.busy, 6),
                "redelivered": op.redelivered,
                "throughput": rows / span,  # rows per second over the window
                "tokens_per_s": tokens / span,
                "busy_fraction": min(1.0, busy / (span * max(op.replicas, 1))),
                "busy_fraction_total": min(1.0, op.busy / (elapsed * max(op.replicas, 1))),
                "in_flight": in_flight,
                "state": self._state(in_flight, op, now),
                "last_finished": op.last_finished,
                "weight_versions": {str(r): v for r, v in self.loaded.get(name, {}).items()},
            }
        trainer = self.staleness.trainer
        trained_rate = operators.get(trainer, {}).get("throughput", 0.0) if trainer else 0.0
        hist = self.stale_hist
        total = int(hist.sum())
        mean = float((hist * np.arange(len(hist))).sum() / total) if total else None
        return {
            "run_id": self.run_id,
            "time": now,
            "status": self.status,
            "elapsed": elapsed,
            "steps_done": self.steps_done,
            "last_step": dict(self.last_step),
            "operators": operators,
            "queue": _queue(queue_stats),
            "weights": {
                "published": dict(self.staleness.published),
                "loaded": {k: {str(r): v for r, v in d.items()} for k, d in self.loaded.items()},
            },
            "staleness": {
                "hist": [int(x) for x in hist],
                "step_hist": [int(x) for x in self.step_hist],
                "mean": mean,
                "max": int(np.nonzero(hist)[0].max()) if total else None,
                "samples": total,
            },
            "totals": {
                "trained": self.trained,
                "tokens": self.tokens,
                "recoveries": self.recoveries,
                "redelivered": self.redelivered,
                "redelivered_leases": self.redelivered_leases,
            },
            "rates": {"samples_per_s": trained_rate, "tokens_per_s": rate_tokens},
            "summary": dict(self.summary),
        }

    def _state(self, in_flight: int, op: _Operator, now: float) -> str:
        if self.status not in ("running", "starting"):
            return "failed" if self.status == "failed" else "done"
        if in_flight:
            return "running"
        if op.last_finished and now - op.last_finished < 1.0:
            return "running"
        return "idle"


def _queue(stats: dict | None) -> dict[str, Any]:
    if not stats:
        return {}
    ready: Counter[str] = Counter()
    for part in stats.get("partitions", {}).values():
        ready.update(part.get("ready", {}))
    return {
        "rows": int(stats.get("rows", 0)),
        "live_rows": int(stats.get("live_rows", 0)),
        "capacity_rows": stats.get("capacity_rows"),
        "bytes": int(stats.get("bytes", 0)),
        "partitions": len(stats.get("partitions", {})),
        "leases_in_flight": int(stats.get("leases_in_flight", 0)),
        "leases_by_task": {k: int(v) for k, v in stats.get("leases_by_task", {}).items()},
        "ready": {k: int(v) for k, v in sorted(ready.items())},
    }


def _num(value: Any) -> Any:
    """JSON- and msgpack-friendly scalars (numpy -> Python; NaN/inf -> None)."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
