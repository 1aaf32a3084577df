"""Reading a run record: steps, dispatches, the rows each operator put, trainer states.

Everything read is Arrow IPC, JSON or safetensors (nothing is unpickled). A damaged file
(a crash mid-write, a truncated copy) raises `RecordError` naming the file, only when
something needs what it lost; every other file, and the readable part of the damaged one,
stays usable. `RunRecord.problems` collects what was found damaged so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asyncflow.errors import AsyncflowError
from asyncflow.runtime.record import layout


class RecordError(AsyncflowError):
    """A run record (or one of its files) is missing, truncated or corrupt."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class DispatchRecord:
    """One micro-batch an operator replica finished, as recorded."""

    seq: int
    step: int
    operator: str
    replica: int
    worker: str
    file: str
    batch: int  # index of its record batch in `file`
    rows: int
    attempt: int
    weight_version: int | None
    started: float
    finished: float
    busy_seconds: float
    inputs: tuple[str, ...]  # the input columns, in the order the replica got them
    inputs_digest: str | None

    @classmethod
    def from_event(cls, step: int, e: dict[str, Any]) -> DispatchRecord:
        return cls(
            seq=int(e["seq"]),
            step=step,
            operator=e["operator"],
            replica=int(e["replica"]),
            worker=str(e.get("worker", "")),
            file=e["file"],
            batch=int(e["batch"]),
            rows=int(e["rows"]),
            attempt=int(e.get("attempt", 0)),
            weight_version=e.get("weight_version"),
            started=float(e.get("started", 0.0)),
            finished=float(e.get("finished", 0.0)),
            busy_seconds=float(e.get("busy_seconds", 0.0)),
            inputs=tuple(e.get("inputs", ())),
            inputs_digest=e.get("inputs_digest"),
        )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(path, "missing") from None
    except (OSError, ValueError) as exc:
        raise RecordError(path, f"unreadable JSON ({exc})") from None


def read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Every readable line; a damaged line (e.g. the last one, cut by a crash) is noted in
    `problems` and skipped."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        problems.append(f"{path}: unreadable ({exc})")
        return []
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            problems.append(f"{path}:{number}: damaged line skipped")
    return out


def read_stream(path: Path) -> tuple[list[pa.RecordBatch], str | None]:
    """The record batches of an Arrow IPC stream, and what is wrong with it (or None)."""
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except FileNotFoundError:
        return [], "missing"
    except (OSError, pa.ArrowException) as exc:
        return [], f"not a readable Arrow IPC stream ({exc})"
    batches: list[pa.RecordBatch] = []
    try:
        for batch in reader:
            batches.append(batch)
    except (OSError, pa.ArrowException) as exc:
        return batches, f"truncated or corrupt after {len(batches)} record batch(es) ({exc})"
    return batches, None


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header and size (None: looks whole)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # safetensors raises its own error types
        return f"unreadable safetensors ({exc})"
    return None


class RunRecord:
    """A run directory's record (RUN_DIR/record), read lazily."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.root = layout.record_dir(self.run_dir)
        if not self.root.is_dir():
            raise RecordError(
                self.root,
                "no run record here (was the run recorded? recording is on by default; "
                "`asyncflow run --no-record` turns it off)",
            )
        self.manifest: dict[str, Any] = read_json(self.root / layout.MANIFEST)
        if self.manifest.get("format") != layout.FORMAT:
            raise RecordError(
                self.root / layout.MANIFEST,
                f"record format {self.manifest.get('format')!r}, this asyncflow reads "
                f"{layout.FORMAT!r}",
            )
        self.problems: list[str] = []
        self._steps: dict[int, StepRecord] = {}
        self._states: dict[str, dict[int, dict[str, Any]]] = {}
        self._events: list[dict[str, Any]] | None = None

    # -- the run ------------------------------------------------------------------------

    @property
    def workflow_name(self) -> str | None:
        return self.manifest.get("workflow_name")

    @property
    def workflow(self) -> dict[str, Any]:
        return self.manifest["workflow"]

    @property
    def operators(self) -> dict[str, dict[str, Any]]:
        return self.manifest["operators"]

    @property
    def recipe(self) -> dict[str, Any]:
        return self.manifest["recipe"]

    @property
    def mode(self) -> str:
        return self.manifest["segments"][-1]["mode"]

    @cached_property
    def producers(self) -> dict[str, str]:
        """Column -> the operator that writes it (the source included)."""
        return {column: op["name"] for op in self.workflow["operators"] for column in op["writes"]}

    def order(self) -> list[str]:
        return [op["name"] for op in self.workflow["operators"]]

    def source_name(self) -> str:
        return next(op["name"] for op in self.workflow["operators"] if op["is_source"])

    def events(self) -> list[dict[str, Any]]:
        """Run-wide events, in order (read once per RunRecord)."""
        if self._events is None:
            self._events = read_jsonl(self.root / layout.EVENTS, self.problems)
        return self._events

    def status(self) -> str:
        ended = [e for e in self.events() if e.get("kind") == "run_finished"]
        if not ended:
            return "unfinished (crashed, killed, or still running)"
        return str(ended[-1].get("status", "?"))

    def evicted(self) -> list[int]:
        return sorted(int(e["step"]) for e in self.events() if e.get("kind") == "evicted")

    def steps(self) -> list[int]:
        directory = self.root / layout.STEPS
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

    def step(self, step: int) -> StepRecord:
        if step not in self._steps:
            directory = layout.step_dir(self.root, step)
            if not directory.is_dir():
                kept = self.steps()
                span = f"steps {kept[0]}-{kept[-1]}" if kept else "no steps"
                why = " (dropped to stay under the record cap)" if step in self.evicted() else ""
                raise RecordError(
                    directory, f"step {step} is not in the record{why}; it has {span}"
                )
            self._steps[step] = StepRecord(self, step)
        return self._steps[step]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def check(self) -> list[str]:
        """Read every data file's structure (Arrow streams through a memory map, state
        headers) and every event; returns `problems`: each damaged file, named."""
        for step in self.steps():
            record = self.step(step)
            files = {e["file"] for e in record.events if "file" in e and "batch" in e}
            for file in sorted(files):
                batches, _ = record._stream(file)
                needed = max(int(e["batch"]) for e in record.events if e.get("file") == file)
                if needed >= len(batches) and not any(file in p for p in self.problems):
                    self.problems.append(
                        f"{record.dir / file}: has {len(batches)} record batch(es), the events "
                        f"refer to {needed + 1}"
                    )
        for name, info in self.operators.items():
            if info.get("trains"):
                self.states(name)  # notes every state file whose header is unreadable
        self.events()
        return list(dict.fromkeys(self.problems))

    def step_of_sample(self, sample_id: int) -> int:
        for step in self.steps():
            for e in self.step(step).events:
                first, last = e.get("first_id"), e.get("last_id")
                if e.get("kind") == "rows" and first is not None and first <= sample_id <= last:
                    return step
        raise RecordError(self.root, f"no recorded step holds sample {sample_id}")

    # -- trainer states -----------------------------------------------------------------

    def states(self, trainer: str) -> dict[int, dict[str, Any]]:
        """Step -> the facts of the trainer's states on disk (keyframes: tensors kept)."""
        if trainer not in self._states:
            self._states[trainer] = self._read_states(trainer)
        return self._states[trainer]

    def _read_states(self, trainer: str) -> dict[int, dict[str, Any]]:
        directory = self.root / layout.STATES / self.operators[trainer]["file"]
        out: dict[int, dict[str, Any]] = {}
        if directory.is_dir():
            for path in sorted(directory.glob("*.safetensors")):
                step = layout.parse_state_step(path)
                if step is None:
                    continue
                problem = _safetensors_problem(path)
                if problem is not None:
                    self.problems.append(f"{path}: {problem}")
                out[step] = {"step": step, **layout.state_facts(path)}
        recorded = {
            e["step"]: e
            for e in self.events()
            if e.get("kind") == "state" and e.get("operator") == trainer
        }
        for step, facts in out.items():  # the digest taken as it was written; the version
            event = recorded.get(step, {})  # from the events when the header is damaged
            facts["digest"] = event.get("digest")
            facts.setdefault("version", event.get("version"))
        return out

    def state(self, trainer: str, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, meta) of `trainer` after `step`, checked against its recorded digest."""
        from safetensors.torch import load_file

        path = layout.state_path(self.root, trainer, step)
        if not path.exists():
            raise RecordError(path, self._why_no_state(trainer, step))
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise RecordError(path, f"unreadable safetensors ({exc})") from None
        facts = layout.state_facts(path)
        if "meta" not in facts:
            raise RecordError(path, "no asyncflow state facts in its metadata")
        recorded = self.states(trainer).get(step, {}).get("digest")
        digest = layout.weights_digest(tensors)
        if recorded and digest != recorded:
            raise RecordError(path, f"weights digest {digest} differs from the recorded {recorded}")
        return tensors, facts["meta"]

    def versions(self, trainer: str) -> dict[int, dict[str, Any]]:
        """Step -> what was recorded of the trainer's state after it: version, weights
        digest, and `file` when the tensors themselves were written (a keyframe)."""
        out: dict[int, dict[str, Any]] = {}
        for e in self.events():
            if e.get("kind") == "resumed":  # states of the attempt the resume replaced
                out = {k: v for k, v in out.items() if k < int(e["first_step"]) - 1}
            elif e.get("kind") == "state" and e.get("operator") == trainer:
                out[int(e["step"])] = e
        return out

    def step_of_version(self, trainer: str, version: int) -> int:
        """The step after which the trainer's weights were `version`."""
        for step, e in sorted(self.versions(trainer).items()):
            if e.get("version") == version:
                return step
        raise RecordError(
            self.root / layout.EVENTS, f"no recorded state of {trainer!r} has weights v{version}"
        )

    def _why_no_state(self, trainer: str, step: int) -> str:
        event = self.versions(trainer).get(step)
        if event is not None and event.get("skipped"):
            return f"the state of {trainer!r} after step {step} was not written: {event['skipped']}"
        if event is not None:
            return f"the state of {trainer!r} after step {step} is not a keyframe (or was dropped)"
        return (
            f"no state of {trainer!r} after step {step} (the step did not finish, or the "
            "state was dropped to stay under the record cap)"
        )


class StepRecord:
    """One step of a record: its rows, dispatches, outputs and metrics."""

    def __init__(self, record: RunRecord, step: int):
        self.record = record
        self.step = step
        self.dir = layout.step_dir(record.root, step)
        self._streams: dict[str, tuple[list[pa.RecordBatch], str | None]] = {}
        self._outputs: dict[str, pa.Table] = {}

    @cached_property
    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.dir / layout.EVENTS, self.record.problems)

    @property
    def complete(self) -> bool:
        """The step finished (a line with its metrics closes its events)."""
        return self.metrics is not None

    @cached_property
    def metrics(self) -> dict[str, Any] | None:
        """The step's metrics record, as in metrics.jsonl; None if it did not finish."""
        done = [e for e in self.events if e.get("kind") == "step_finished"]
        return done[-1]["metrics"] if done else None

    def _last_rows_seq(self) -> int | None:
        rows = [e["seq"] for e in self.events if e.get("kind") == "rows"]
        return max(rows) if len(rows) > 1 else None

    def dispatches(self, operator: str | None = None, *, effective: bool = True):
        """The step's dispatches in the order they finished (per replica: the order they
        ran). `effective`: only what the step's result is made of -- after a sync step
        was redone, the redo's; for a trainer whose step was retried, the last attempt's."""
        events = [e for e in self.events if e.get("kind") == "dispatch"]
        if operator is not None:
            events = [e for e in events if e["operator"] == operator]
        out = [DispatchRecord.from_event(self.step, e) for e in events]
        if effective:
            after = self._last_rows_seq()
            if after is not None:
                out = [d for d in out if d.seq > after]
            last_attempt: dict[str, int] = {}
            for d in out:
                last_attempt[d.operator] = max(last_attempt.get(d.operator, 0), d.attempt)
            out = [d for d in out if d.attempt == last_attempt[d.operator]]
        return sorted(out, key=lambda d: d.seq)

    def end_step_metrics(self, operator: str) -> dict[int, dict[str, float]]:
        """Replica -> the metrics its `end_step` returned (trainers), the last recorded."""
        out: dict[int, dict[str, float]] = {}
        for e in self.events:
            if e.get("kind") == "end_step" and e["operator"] == operator:
                out[int(e["replica"])] = e["metrics"]
        return out

    def operators(self) -> list[str]:
        seen = {e["operator"] for e in self.events if e.get("kind") == "dispatch"}
        return [name for name in self.record.order() if name in seen]

    # -- data ---------------------------------------------------------------------------

    def _stream(self, file: str) -> tuple[list[pa.RecordBatch], str | None]:
        if file not in self._streams:
            batches, problem = read_stream(self.dir / file)
            if problem is not None:
                self.record.problems.append(f"{self.dir / file}: {problem}")
            self._streams[file] = (batches, problem)
        return self._streams[file]

    def batch(self, file: str, index: int) -> pa.RecordBatch:
        batches, problem = self._stream(file)
        if index < len(batches):
            return batches[index]
        raise RecordError(
            self.dir / file,
            f"record batch {index} is not readable: {problem or 'the file has fewer batches'}",
        )

    def output(self, dispatch: DispatchRecord) -> pa.RecordBatch:
        """`sample_id` + the columns the dispatch put, as recorded."""
        return self.batch(dispatch.file, dispatch.batch)

    def source(self) -> pa.Table:
        """The step's source rows (with `sample_id`): the last rows added (a redone sync
        step adds them again under new ids)."""
        rows = [e for e in self.events if e.get("kind") == "rows"]
        if not rows:
            raise RecordError(
                self.dir / layout.EVENTS, f"no source rows recorded for step {self.step}"
            )
        last = rows[-1]
        return pa.Table.from_batches([self.batch(last["file"], int(last["batch"]))])

    def outputs(self, operator: str) -> pa.Table:
        """Every row the operator put this step (effective dispatches), `sample_id` first."""
        if operator not in self._outputs:
            if operator == self.record.source_name():
                table = self.source()
            else:
                batches = [self.output(d) for d in self.dispatches(operator)]
                if not batches:
                    raise RecordError(
                        self.dir,
                        f"operator {operator!r} has no recorded output at step {self.step}",
                    )
                table = pa.concat_tables(
                    [pa.Table.from_batches([b]) for b in batches], promote_options="default"
                )
            self._outputs[operator] = table
        return self._outputs[operator]

    def columns(
        self, names: list[str], sample_ids: np.ndarray | list[int], *, missing: str = "error"
    ) -> pa.Table:
        """The columns `names` of the rows `sample_ids`, in that order, from the outputs of
        the operators that wrote them: exactly what the TransferQueue held. A row an
        operator did not write (a step cut short) is an error, or null with
        `missing="null"`."""
        ids = pa.array(np.asarray(sample_ids, dtype=np.int64), pa.int64())
        arrays, fields = [ids], [pa.field(layout.SAMPLE_ID, pa.int64())]
        for name in names:
            if name == layout.SAMPLE_ID:
                continue
            producer = self.record.producers.get(name)
            if producer is None:
                raise RecordError(
                    self.record.root / layout.MANIFEST, f"no operator writes column {name!r}"
                )
            table = self.outputs(producer)
            at = pc.index_in(ids, value_set=table.column(layout.SAMPLE_ID))
            if at.null_count and missing == "error":
                absent = ids.filter(pc.is_null(at)).to_pylist()[:10]
                raise RecordError(
                    self.dir,
                    f"column {name!r} (written by {producer!r}) is not recorded for samples "
                    f"{absent} of step {self.step}",
                )
            column = table.column(name).take(at)
            arrays.append(
                column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            )
            fields.append(table.schema.field(name))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def table(self) -> pa.Table:
        """Every recorded column of the step's rows, one row per sample, in id order (null
        where an operator did not get to a row)."""
        ids = np.sort(self.source().column(layout.SAMPLE_ID).to_numpy())
        names = [
            column
            for op in self.record.workflow["operators"]
            for column in op["writes"]
            if op["is_source"] or self.dispatches(op["name"])
        ]
        return self.columns(names, ids, missing="null")
