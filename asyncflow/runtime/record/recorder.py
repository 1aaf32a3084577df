"""`Recorder`: the run observer that records every put, dispatch decision and trainer state.

Hooks are called on the driver from executor threads; each one only stamps a sequence
number and queues references (Arrow batches and tensors are immutable here), so a hook
costs microseconds. One background thread (`RecordWriter`) writes the files. If the
writer falls more than `max_pending_bytes` behind, hooks wait for it (the run slows down
rather than the driver running out of memory). A writer failure (disk full...) is logged
once and switches recording off; it never stops the run.

    executor = SyncExecutor(recipe, client, run_dir, observers=[Recorder(run_dir)])
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from asyncflow.runtime.events import Dispatch, RunInfo, RunObserver
from asyncflow.runtime.record import layout
from asyncflow.runtime.record.writer import RecordWriter

log = logging.getLogger(__name__)

_STOP = "stop"
_URGENT = frozenset({_STOP, "sync", "run_finished"})  # someone waits for these


class Recorder(RunObserver):
    """Records a run into RUN_DIR/record (see `layout.py`) for `asyncflow replay/inspect`.

    run_dir: where the record goes (default: the run's directory, from `run_started`).
    cap: size cap ("2GB", bytes, or None for none); the oldest finished steps are dropped
        to stay under it. enabled=False records nothing. verify_inputs: store a digest of
        every micro-batch's inputs, so a replay proves it rebuilt exactly those inputs.
    state_every: a trainer's full state (weights and optimizer) is written every n steps
        and at the run's first and last step; every step's weights digest always. A
        replay rebuilds the states in between from the recorded micro-batches (1: every
        state on disk, for tensor-by-tensor diffs of every update).
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        *,
        cap: str | int | None = layout.DEFAULT_CAP,
        enabled: bool = True,
        verify_inputs: bool = True,
        state_every: int = 10,
        max_pending_bytes: int = 512 * 2**20,
        finish_timeout: float = 300.0,
        batch_seconds: float = 0.05,
    ):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cap_bytes = layout.parse_size(cap)
        self.cap_text = None if cap is None else str(cap)
        self.enabled = enabled
        self.verify_inputs = verify_inputs
        self.state_every = state_every
        self.max_pending_bytes = max_pending_bytes
        self.finish_timeout = finish_timeout
        self.batch_seconds = batch_seconds
        self._wake = threading.Event()  # cuts the writer's batching pause short
        self.error: BaseException | None = None  # what stopped the writer, if anything
        self.root: Path | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._seq = 0
        self._pending = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._hook_seconds = 0.0  # driver time spent inside the hooks
        self._writer_cpu = 0.0  # CPU time of the writer thread
        self._items = 0

    def stats(self) -> dict[str, float]:
        """What recording cost: time inside the hooks (driver threads), CPU time of the
        writer thread, items written."""
        return {
            "hook_seconds": self._hook_seconds,
            "writer_cpu_seconds": self._writer_cpu,
            "items": float(self._items),
        }

    def __repr__(self) -> str:
        where = self.root or self.run_dir
        return f"Recorder({str(where)!r}, cap={self.cap_text!r}, enabled={self.enabled})"

    # -- hooks (driver threads: cheap) --------------------------------------------------

    def run_started(self, info: RunInfo) -> None:
        self.root = layout.record_dir(self.run_dir or info.run_dir)
        self._put("run_started", (info,))

    def rows_added(self, step: int, rows: pa.RecordBatch) -> None:
        self._put("rows", (step, rows), rows.nbytes)

    def dispatched(self, dispatch: Dispatch) -> None:
        self._put("dispatch", (dispatch,), dispatch.outputs.nbytes)

    def step_ended(self, operator: str, replica: int, step: int, metrics: dict) -> None:
        self._put("step_ended", (operator, replica, step, dict(metrics)))

    def state_saved(self, operator: str, step: int, tensors: dict[str, Any], meta: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self._put("state", (operator, step, dict(tensors), dict(meta)), size)

    def weights_published(self, operator: str, version: int, weights: dict[str, Any]) -> None:
        self._put("note", ({"kind": "published", "operator": operator, "version": version},))

    def weights_loaded(self, operator: str, replica: int, version: int) -> None:
        event = {"kind": "loaded", "operator": operator, "replica": replica, "version": version}
        self._put("note", (event,))

    def recovered(self, message: str, operator: str | None = None) -> None:
        self._put("note", ({"kind": "recovered", "operator": operator, "message": message},))

    def step_finished(self, record: dict[str, Any]) -> None:
        self._put("step_finished", (dict(record),))

    def run_finished(self, summary: dict[str, Any]) -> None:
        self._put("run_finished", (dict(summary),))
        self.close()

    # -- life cycle ---------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything recorded so far is written (True), or `timeout` passed."""
        if not self.enabled or self._thread is None or self.root is None:
            return True
        done = threading.Event()
        self._put("sync", (done,))
        if self._closed or self.error is not None:
            return True
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, then stop the writer thread (idempotent)."""
        with self._lock:
            thread, already = self._thread, self._closed
            self._closed = True
            if thread is not None and not already:
                self._queue.put((_STOP, 0, 0, ()))
                self._wake.set()
        if thread is not None:
            thread.join(self.finish_timeout if timeout is None else timeout)
            if thread.is_alive():
                log.warning("recorder: the writer did not finish within %ss", timeout)

    def _put(self, kind: str, args: tuple, nbytes: int = 0) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        with self._lock:
            if self._closed or self.error is not None:
                return
            started = self.root is not None and kind != "run_started"
            while started and self._pending > self.max_pending_bytes and self.error is None:
                self._room.wait(1.0)  # the writer is behind: wait for it to catch up
            self._seq += 1
            self._pending += nbytes
            self._queue.put((kind, self._seq, nbytes, args))
            if kind in _URGENT:
                self._wake.set()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._write_loop, name="asyncflow-recorder", daemon=True
                )
                self._thread.start()
            self._hook_seconds += time.perf_counter() - start

    # -- the writer thread --------------------------------------------------------------

    def _write_loop(self) -> None:
        writer: RecordWriter | None = None
        deferred: list[tuple] = []  # what came before run_started (the initial states)
        cpu_start = time.thread_time()
        while True:
            item = self._queue.get()
            kind, _, nbytes, _ = item
            if kind == _STOP:
                break
            try:
                if self.error is not None:
                    pass  # recording is off: drain without writing
                elif kind == "run_started":
                    writer = RecordWriter(
                        self.root, self.cap_bytes, self.verify_inputs, self.state_every
                    )
                    writer.start(item[3][0], self.cap_text)
                    for earlier in deferred:
                        self._handle(writer, earlier)
                        self._release(earlier[2])
                    deferred.clear()
                elif writer is None:
                    deferred.append(item)
                    continue
                else:
                    self._handle(writer, item)
                if writer is not None and self._queue.empty():
                    writer.flush(force=kind == "step_finished")
            except Exception as exc:
                log.exception("recorder: writing %s failed; recording is off for this run", kind)
                with self._lock:
                    self.error = exc
                    self._room.notify_all()
            finally:
                if kind != _STOP and not (writer is None and kind != "run_started"):
                    self._release(nbytes)
                self._items += 1
                if kind == "sync":  # whatever happened, nobody waits forever
                    item[3][0].set()
                if kind == "step_finished":  # thread_time is a system call: not per item
                    self._writer_cpu = time.thread_time() - cpu_start
            if self._queue.empty():
                # Batch: let items gather before waking up again, so one wake-up, context
                # switch and GIL hand-over serve many; urgent ones cut the pause short.
                # Each burst holds the GIL for about a millisecond, well under the 5 ms
                # switch interval a driver thread would otherwise wait for it.
                self._wake.wait(self.batch_seconds)
                self._wake.clear()
        if writer is not None and self.error is None:
            try:
                writer.flush()
            except Exception:
                log.exception("recorder: final flush failed")
        self._writer_cpu = time.thread_time() - cpu_start

    def _release(self, nbytes: int) -> None:
        if nbytes:
            with self._lock:
                self._pending -= nbytes
                self._room.notify_all()

    def _handle(self, writer: RecordWriter, item: tuple) -> None:
        kind, seq, _, args = item
        if kind == "dispatch":
            writer.dispatch(seq, *args)
        elif kind == "rows":
            writer.rows(seq, *args)
        elif kind == "step_ended":
            writer.step_ended(seq, *args)
        elif kind == "state":
            writer.state(seq, *args)
        elif kind == "note":
            writer.note({**args[0], "seq": seq})
        elif kind == "step_finished":
            writer.step_finished(seq, *args)
        elif kind == "run_finished":
            writer.finish(seq, *args)
        elif kind == "sync":
            writer.flush()
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown record item {kind!r}")
