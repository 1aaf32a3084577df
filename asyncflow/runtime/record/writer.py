"""The record's file writer: runs on the recorder's own thread, never on an executor's.

It turns the events the `Recorder` queued into the layout of `layout.py`: Arrow IPC
streams per (step, operator), JSON lines of events, safetensors trainer states. It keeps
the record within its size cap by dropping the oldest finished steps (and the trainer
states only they needed); the newest finished step is always kept.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import pyarrow as pa

from asyncflow.runtime.record import layout
from asyncflow.runtime.record.manifest import build_manifest

if TYPE_CHECKING:
    from asyncflow.runtime.events import Dispatch, RunInfo

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """One open Arrow IPC stream file of a step."""

    path: Path
    sink: Any
    writer: Any
    schema: pa.Schema
    batches: int = 0


@dataclass
class _Step:
    streams: dict[str, _Stream] = field(default_factory=dict)  # stem -> its open stream
    parts: dict[str, int] = field(default_factory=dict)  # stem -> files opened so far
    events: TextIO | None = None
    bytes: int = 0  # written to its files so far (closed streams and event lines)


class RecordWriter:
    """Writes one run's record under `root` (RUN_DIR/record). Not thread-safe: one thread."""

    flush_seconds = 0.2  # buffered event lines reach the OS at least this often

    def __init__(
        self,
        root: Path,
        cap_bytes: int | None,
        verify_inputs: bool = True,
        state_every: int = 10,
    ):
        self.root = root
        self.cap_bytes = cap_bytes
        self.verify_inputs = verify_inputs
        self.state_every = max(1, int(state_every))
        self.max_staleness = 0
        self.first_step = 0
        self.last_step: int | None = None
        self._every: dict[str, int] = {}  # trainer -> write its full state every n steps
        self._steps: dict[int, _Step] = {}
        self._events: TextIO | None = None
        self._step_bytes: dict[int, int] = {}  # finished steps still on disk -> bytes
        self._state_bytes: dict[tuple[str, int], int] = {}  # (trainer, step) -> bytes
        self._finished: list[int] = []  # finished steps on disk, oldest first
        self._made: set[Path] = set()  # directories known to exist
        self._flushed = 0.0

    # -- run ----------------------------------------------------------------------------

    def start(self, info: RunInfo, cap_text: str | None) -> None:
        self.max_staleness = info.max_staleness
        self.first_step = info.first_step
        self.last_step = info.recipe.steps - 1
        # data-parallel ranks do not replay bit for bit in one process: every state is kept
        self._every = {
            name: 1 if node.replicas > 1 else self.state_every
            for name, node in info.graph.nodes.items()
        }
        previous = self._read_previous_manifest()
        if info.first_step == 0 or previous is None:
            for name in (layout.STEPS, layout.STATES, layout.EVENTS, layout.MANIFEST):
                _remove(self.root / name)  # a new run in this directory: a new record
            previous = None
        else:
            self._drop_from(info.first_step)  # superseded by the resumed run
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = build_manifest(info, self.cap_bytes, cap_text, self.verify_inputs)
        manifest["state_every"] = self.state_every
        if previous is not None:
            manifest["segments"] = previous.get("segments", []) + manifest["segments"]
        layout.write_json_atomic(self.root / layout.MANIFEST, manifest)
        self._events = open(self.root / layout.EVENTS, "a")  # noqa: SIM115 (kept open)
        if previous is not None:  # what the crashed attempt recorded from here on is void
            self._event({"kind": "resumed", "first_step": info.first_step, "time": time.time()})
        self._account_existing()

    def finish(self, seq: int, summary: dict[str, Any]) -> None:
        for step in list(self._steps):
            self._close_step(step)
        self._event({"kind": "run_finished", "seq": seq, "time": time.time(), **summary})
        if self._events is not None:
            self._events.close()
            self._events = None

    def flush(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._flushed < self.flush_seconds:
            return
        self._flushed = now
        if self._events is not None:
            self._events.flush()
        for step in self._steps.values():
            if step.events is not None:
                step.events.flush()
            for stream in step.streams.values():
                stream.sink.flush()

    # -- data ---------------------------------------------------------------------------

    def rows(self, seq: int, step: int, rows: pa.RecordBatch) -> None:
        ids = rows.column(layout.SAMPLE_ID).to_numpy()
        file, index = self._append(step, layout.SOURCE, rows)
        self._step_event(
            step,
            {
                "kind": "rows",
                "seq": seq,
                "file": file,
                "batch": index,
                "rows": rows.num_rows,
                "first_id": int(ids[0]) if len(ids) else None,
                "last_id": int(ids[-1]) if len(ids) else None,
                "time": time.time(),
            },
        )

    def dispatch(self, seq: int, d: Dispatch) -> None:
        outputs = d.outputs
        if layout.SAMPLE_ID in outputs.schema.names:
            outputs = outputs.drop_columns([layout.SAMPLE_ID])
        ids = pa.array(np.asarray(d.sample_ids, dtype=np.int64), pa.int64())
        batch = pa.RecordBatch.from_arrays(
            [ids, *outputs.columns], names=[layout.SAMPLE_ID, *outputs.schema.names]
        )
        file, index = self._append(d.step, layout.safe_name(d.operator), batch)
        event = {
            "kind": "dispatch",
            "seq": seq,
            "operator": d.operator,
            "replica": d.replica,
            "worker": d.worker,
            "file": file,
            "batch": index,
            "rows": batch.num_rows,
            "attempt": d.attempt,
            "weight_version": d.weight_version,
            "started": d.started,
            "finished": d.finished,
            "busy_seconds": d.busy_seconds,
            "inputs": d.inputs.schema.names,
        }
        if self.verify_inputs:
            event["inputs_digest"] = layout.batch_digest(d.inputs)
        self._step_event(d.step, event)

    def step_ended(self, seq: int, operator: str, replica: int, step: int, metrics: dict) -> None:
        self._step_event(
            step,
            {
                "kind": "end_step",
                "seq": seq,
                "operator": operator,
                "replica": replica,
                "metrics": metrics,
            },
        )

    def state(self, seq: int, operator: str, step: int, tensors: dict, meta: dict) -> None:
        """A trainer's state after `step`: always its weights digest (an event); the tensors
        themselves at keyframes -- the run's first and last state and every
        `state_every`-th step. A replay rebuilds the states in between from the nearest
        keyframe and the recorded micro-batches, checking each against its digest."""
        event = {"kind": "state", "seq": seq, "operator": operator, "step": step}
        event["version"] = int(meta["version"]) if "version" in meta else None
        every = self._every.get(operator, self.state_every)
        keyframe = step < self.first_step or step == self.last_step or (step + 1) % every == 0
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if keyframe and self.cap_bytes is not None and size > self.cap_bytes / 4:
            keyframe = False
            event["skipped"] = (
                f"state of {layout.format_size(size)} is more than a quarter of the record "
                f"cap ({layout.format_size(self.cap_bytes)})"
            )
        if not keyframe:
            event["digest"] = layout.weights_digest(tensors)
            self._event(event)
            return
        path = layout.state_path(self.root, operator, step)
        self._mkdir(path.parent)
        facts = {"operator": operator, "step": step, "version": event["version"], "meta": meta}
        event["digest"], written = layout.save_state(path, tensors, facts)
        self._state_bytes[(operator, step)] = written
        self._event({**event, "file": str(path.relative_to(self.root))})

    def note(self, event: dict[str, Any]) -> None:
        """A run-wide event (weights published/loaded, recovery)."""
        self._event(event)

    def step_finished(self, seq: int, record: dict[str, Any]) -> None:
        """The step's metrics close its events file: that line marks it finished."""
        step = int(record["step"])
        self._step_event(step, {"kind": "step_finished", "seq": seq, "metrics": record})
        self._step_bytes[step] = self._close_step(step)
        if step not in self._finished:
            self._finished.append(step)
        self._enforce_cap()

    # -- files --------------------------------------------------------------------------

    def _step(self, step: int) -> _Step:
        if step not in self._steps:
            self._steps[step] = _Step()
            self._mkdir(layout.step_dir(self.root, step))
        return self._steps[step]

    def _mkdir(self, path: Path) -> None:
        if path not in self._made:
            path.mkdir(parents=True, exist_ok=True)
            self._made.add(path)

    def _append(self, step: int, stem: str, batch: pa.RecordBatch) -> tuple[str, int]:
        """Write `batch` to the step's stream `stem`; returns (file name, batch index).

        A batch whose schema differs from the open stream's (an operator declaring "any"
        type) starts a new part file, `stem.1.arrow`, `stem.2.arrow`, ...
        """
        record = self._step(step)
        stream = record.streams.get(stem)
        if stream is None or not stream.schema.equals(batch.schema):
            if stream is not None:
                record.bytes += _close_stream(stream)
            part = record.parts.get(stem, 0)
            record.parts[stem] = part + 1
            name = f"{stem}.arrow" if part == 0 else f"{stem}.{part}.arrow"
            path = layout.step_dir(self.root, step) / name
            sink = pa.BufferedOutputStream(pa.OSFile(str(path), "wb"), buffer_size=1 << 16)
            stream = _Stream(path, sink, pa.ipc.new_stream(sink, batch.schema), batch.schema)
            record.streams[stem] = stream
        stream.writer.write_batch(batch)
        stream.batches += 1
        return stream.path.name, stream.batches - 1

    def _step_event(self, step: int, event: dict[str, Any]) -> None:
        record = self._step(step)
        if record.events is None:
            path = layout.step_dir(self.root, step) / layout.EVENTS
            record.events = open(path, "a")  # noqa: SIM115 (kept open)
        line = layout.json_dumps(event) + "\n"
        record.events.write(line)
        record.bytes += len(line)

    def _event(self, event: dict[str, Any]) -> None:
        if self._events is not None:
            self._events.write(layout.json_dumps(event) + "\n")

    def _close_step(self, step: int) -> int:
        """Close the step's files; returns the bytes written to them."""
        record = self._steps.pop(step, None)
        if record is None:
            return 0
        for stream in record.streams.values():
            record.bytes += _close_stream(stream)
        if record.events is not None:
            record.events.close()
        return record.bytes

    # -- the cap ------------------------------------------------------------------------

    def _enforce_cap(self) -> None:
        """Drop the oldest finished steps, a keyframe's worth at a time: the oldest kept
        step K needs the state after K-1, which is the keyframe just before it, or one
        rebuilt from an older keyframe and the steps in between (all kept together)."""
        if self.cap_bytes is None:
            return
        while self._total() > self.cap_bytes and len(self._finished) > 1:
            keyframes = sorted({step for _, step in self._state_bytes})
            cut = [k for k in keyframes if self._finished[0] <= k < self._finished[-1]]
            if not cut:
                return  # nothing can go without making the kept steps unreplayable
            freed = 0
            dropped = [step for step in self._finished if step <= cut[0]]
            for step in dropped:
                self._finished.remove(step)
                freed += self._step_bytes.pop(step, 0)
                _remove(layout.step_dir(self.root, step))
                self._made.discard(layout.step_dir(self.root, step))
            for trainer, step in [k for k in self._state_bytes if k[1] < cut[0]]:
                freed += self._state_bytes.pop((trainer, step))
                layout.state_path(self.root, trainer, step).unlink(missing_ok=True)
            for step in dropped:
                self._event({"kind": "evicted", "step": step, "time": time.time()})
            self._event({"kind": "evicted_bytes", "bytes": freed, "through": cut[0]})

    def _total(self) -> int:
        return sum(self._step_bytes.values()) + sum(self._state_bytes.values())

    def _account_existing(self) -> None:
        """Sizes of what a resumed run's record already holds, for the cap."""
        steps = self.root / layout.STEPS
        if steps.is_dir():
            for directory in sorted(steps.iterdir()):
                events = directory / layout.EVENTS
                if directory.name.isdigit() and _finished(events):
                    self._step_bytes[int(directory.name)] = _tree_size(directory)
            self._finished = sorted(self._step_bytes)
        states = self.root / layout.STATES
        if states.is_dir():
            for path in states.glob("*/*.safetensors"):
                step = layout.parse_state_step(path)
                name = layout.state_facts(path).get("operator")
                if step is not None and name:
                    self._state_bytes[(name, step)] = path.stat().st_size

    def _read_previous_manifest(self) -> dict | None:
        import json

        try:
            return json.loads((self.root / layout.MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def _drop_from(self, first_step: int) -> None:
        """Remove steps >= first_step and states after first_step - 1 (a crashed attempt's)."""
        steps = self.root / layout.STEPS
        if steps.is_dir():
            for directory in steps.iterdir():
                if directory.name.isdigit() and int(directory.name) >= first_step:
                    _remove(directory)
        states = self.root / layout.STATES
        if states.is_dir():
            for path in list(states.glob("*/*.safetensors")):
                step = layout.parse_state_step(path)
                if step is not None and step >= first_step - 1:
                    path.unlink(missing_ok=True)


def _finished(events: Path) -> bool:
    try:
        return '"kind": "step_finished"' in events.read_text(errors="replace")
    except OSError:
        return False


def _close_stream(stream: _Stream) -> int:
    """Close an Arrow stream file; returns its size."""
    try:
        stream.writer.close()
        size = stream.sink.tell()
    finally:
        stream.sink.close()
    return size


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
