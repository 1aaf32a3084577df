"""What a run tells its observers: the seam between executors and everything that watches.

Executors (sync and async) call these hooks on the driver side; metrics, the
dashboard page, progress displays and the run recorder implement the ones they
need. Keeping one small vocabulary of events means a new observer never has to
reach into an executor, and an executor change never breaks an observer.

Hooks are called from executor threads, possibly several at once: observers
must be thread-safe and quick (hand heavy work to their own thread). An
observer that raises is reported once and switched off; it never stops a run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from asyncflow.graph import WorkflowGraph
    from asyncflow.runtime.queue import TransferQueue
    from asyncflow.workflows.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """Everything fixed for the run, handed to `run_started`."""

    run_dir: Path
    mode: str  # "sync" | "async"
    graph: WorkflowGraph
    recipe: Recipe
    queue: TransferQueue  # read-only use: occupancy, leases in flight
    dashboard: str | None  # http://127.0.0.1:PORT/status, when the scheduler serves one
    scheduler: str  # tcp://HOST:PORT
    max_staleness: int = 0
    first_step: int = 0  # > 0 when resuming
    config: dict[str, Any] = field(default_factory=dict)  # the workflow config (JSON-able)
    workflow_name: str | None = None  # registry name (`asyncflow run NAME`), when known


@dataclass(frozen=True)
class Dispatch:
    """One micro-batch that an operator replica finished (its outputs are stored)."""

    operator: str
    replica: int
    worker: str  # Dask worker address the replica lives on
    step: int
    sample_ids: np.ndarray  # int64, in the order of `inputs` rows
    inputs: pa.RecordBatch  # exactly what the replica was given (incl. sample_id)
    outputs: pa.RecordBatch  # what it returned (checked), without sample_id; may have 0 columns
    started: float  # wall clock (time.time()) when the driver sent it
    finished: float  # wall clock when the result arrived
    busy_seconds: float  # time the operator itself spent (measured on the worker)
    weight_version: int | None = None  # version of the weights it ran with, if it has weights
    attempt: int = 0  # > 0 when the rows were redelivered after a failure


class RunObserver:
    """Base class: every hook does nothing. Override the ones you need."""

    def run_started(self, info: RunInfo) -> None: ...

    def rows_added(self, step: int, rows: pa.RecordBatch) -> None:
        """The source produced a step's rows (with `sample_id`)."""

    def dispatched(self, dispatch: Dispatch) -> None:
        """A micro-batch finished and its outputs are in the queue."""

    def step_ended(self, operator: str, replica: int, step: int, metrics: dict) -> None:
        """`end_step` returned on one replica (trainers: the optimizer stepped)."""

    def weights_published(self, operator: str, version: int, weights: dict[str, Any]) -> None:
        """A trainer's new weights (torch tensors; do not modify) were taken for sync."""

    def weights_loaded(self, operator: str, replica: int, version: int) -> None:
        """A replica now runs with this weight version."""

    def state_saved(self, operator: str, step: int, tensors: dict[str, Any], meta: dict) -> None:
        """A trainer's full state (weights, optimizer; safetensors-able tensors + JSON meta)
        after `step` (-1 / first step - 1: before training). Do not modify the tensors."""

    def step_finished(self, record: dict[str, Any]) -> None:
        """A step is complete: its metrics record (also written to metrics.jsonl)."""

    def recovered(self, message: str, operator: str | None = None) -> None:
        """Something failed and the run went on (worker lost, replica recreated...)."""

    def run_finished(self, summary: dict[str, Any]) -> None:
        """The run ended (normally or not: `summary["status"]`)."""


class Observers(RunObserver):
    """Fans every hook out to many observers; a failing observer is logged and dropped."""

    def __init__(self, observers: list[RunObserver] | None = None):
        self._observers = list(observers or [])
        self._lock = threading.Lock()

    def add(self, observer: RunObserver) -> None:
        with self._lock:
            self._observers.append(observer)

    def __iter__(self):
        return iter(list(self._observers))

    def _call(self, hook: str, *args: Any) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.exception("observer %r failed in %s; it is switched off", observer, hook)
                with self._lock:
                    if observer in self._observers:
                        self._observers.remove(observer)

    def run_started(self, info: RunInfo) -> None:
        self._call("run_started", info)

    def rows_added(self, step: int, rows: pa.RecordBatch) -> None:
        self._call("rows_added", step, rows)

    def dispatched(self, dispatch: Dispatch) -> None:
        self._call("dispatched", dispatch)

    def step_ended(self, operator: str, replica: int, step: int, metrics: dict) -> None:
        self._call("step_ended", operator, replica, step, metrics)

    def weights_published(self, operator: str, version: int, weights: dict[str, Any]) -> None:
        self._call("weights_published", operator, version, weights)

    def weights_loaded(self, operator: str, replica: int, version: int) -> None:
        self._call("weights_loaded", operator, replica, version)

    def state_saved(self, operator: str, step: int, tensors: dict[str, Any], meta: dict) -> None:
        self._call("state_saved", operator, step, tensors, meta)

    def step_finished(self, record: dict[str, Any]) -> None:
        self._call("step_finished", record)

    def recovered(self, message: str, operator: str | None = None) -> None:
        self._call("recovered", message, operator)

    def run_finished(self, summary: dict[str, Any]) -> None:
        self._call("run_finished", summary)
