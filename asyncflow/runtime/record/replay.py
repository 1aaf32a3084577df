"""Re-run recorded operators in this process, on exactly the inputs they saw, and diff.

For each recorded micro-batch of an operator at a step, the replay rebuilds the input
batch from the record (the columns the TransferQueue held for those rows, in the
recorded row order; checked against the digest taken at run time), gives the operator
the weights it ran with (the trainer state of the recorded weight version, or the
prepared warm start), calls it as the replica did (same name, replica index and seeds),
checks the output like the worker did, and compares it column by column with what
the run put into the queue.

Trainers write no columns: replaying "the update" of step K restores the trainer's
state after step K-1 (its keyframe on disk, or rebuilt from an earlier keyframe by
replaying the recorded updates in between, each checked against its weights digest),
feeds the step's recorded micro-batches in recorded order, calls `end_step(K)`, and
compares the `end_step` metrics and the resulting state with what was recorded after
step K: every tensor (weights and optimizer moments) at a keyframe, the weights digest
otherwise.

A whole step replays the source and every operator, each on its recorded inputs, and
recomputes the step's metrics from the replayed rows. No cluster is needed.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asyncflow.errors import AsyncflowError
from asyncflow.operators.base import Operator, OperatorContext
from asyncflow.runtime.record import layout
from asyncflow.runtime.record.diff import ColumnDiff, Tolerance, diff_tables
from asyncflow.runtime.record.reader import DispatchRecord, RecordError, RunRecord, StepRecord


@dataclass
class ValueDiff:
    """One tensor of a trainer state, or one metric."""

    name: str
    ok: bool
    max_abs_diff: float = 0.0
    recorded: Any = None
    replayed: Any = None
    note: str = ""


@dataclass
class OperatorReplay:
    operator: str
    step: int
    dispatches: int = 0
    rows: int = 0
    replicas: list[int] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    inputs_verified: int = 0  # micro-batches whose rebuilt inputs matched the run's digest
    columns: list[ColumnDiff] = field(default_factory=list)
    state: list[ValueDiff] = field(default_factory=list)  # trainers: tensors after the step
    metrics: list[ValueDiff] = field(default_factory=list)  # trainers: end_step metrics
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # sample id -> (micro-batch index, replica, worker) in the run
    where: dict[int, tuple[int, int, str]] = field(default_factory=dict)
    replayed: pa.Table | None = field(default=None, repr=False)  # the replayed rows

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and all(c.ok for c in self.columns)
            and all(v.ok for v in self.state)
            and all(v.ok for v in self.metrics)
        )

    @property
    def exact(self) -> bool:
        """Identical outputs, bit for bit (not just within tolerance)."""
        return (
            self.ok
            and all(c.status == "identical" for c in self.columns)
            and all(v.max_abs_diff == 0 for v in self.state + self.metrics)
        )

    def differing_rows(self) -> dict[str, list[int]]:
        return {c.column: c.differing for c in self.columns if c.differing}


@dataclass
class StepReplay:
    step: int
    operators: list[OperatorReplay] = field(default_factory=list)
    metrics: list[ValueDiff] = field(default_factory=list)  # the step's metrics, recomputed
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.operators) and all(m.ok for m in self.metrics)

    @property
    def exact(self) -> bool:
        return (
            self.ok
            and all(o.exact for o in self.operators)
            and all(m.max_abs_diff == 0 for m in self.metrics)
        )


class Replayer:
    """Replays operators of a recorded run in this process.

    run_dir: the run directory (its `record/` is read). The workflow is rebuilt from the
    registry name and config the record holds; pass `recipe=` or `workflow=` for a run
    started from Python with a workflow of its own, and `operators={name: operator}` to
    replay a different implementation (say, a fixed one) on the recorded inputs.
    threads: torch threads while replaying (the run's replicas used 1 unless told).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        recipe: Any = None,
        workflow: Any = None,
        operators: Mapping[str, Operator] | None = None,
        tolerance: Tolerance | None = None,
        threads: int | None = None,
    ):
        self.record = RunRecord(run_dir)
        self.run_dir = Path(run_dir)
        self.tolerance = tolerance or Tolerance()
        self.threads = threads
        self.warnings: list[str] = []
        self.recipe = recipe
        if workflow is None and recipe is None:
            self.recipe = self._rebuild_recipe()
        source = workflow if workflow is not None else self.recipe.workflow
        self.graph = source.build() if hasattr(source, "build") else source
        self.overrides = dict(operators or {})
        unknown = sorted(set(self.overrides) - set(self.graph.nodes))
        if unknown:
            raise AsyncflowError(f"replay: no operators {unknown} in the workflow")
        self.seed = int(self.record.recipe["seed"])
        self._instances: dict[tuple[str, int], Operator] = {}
        self._loaded: dict[tuple[str, int], int | None] = {}
        self._states: OrderedDict[tuple[str, int], tuple[dict, dict]] = OrderedDict()
        self._warm: dict[str, Any] | None = None
        self._check_workflow()

    # -- set-up -------------------------------------------------------------------------

    def _rebuild_recipe(self):
        from asyncflow.cli import _from_dict
        from asyncflow.workflows import lookup

        name = self.record.workflow_name
        if not name:
            raise RecordError(
                self.record.root / layout.MANIFEST,
                "the record names no registered workflow (a run started from Python?): "
                "pass recipe= or workflow= to Replayer",
            )
        entry = lookup(name)
        cfg = _from_dict(entry.config_type, self.record.manifest.get("config") or {})
        return entry.recipe(cfg, self.run_dir)

    def _check_workflow(self) -> None:
        from asyncflow.runtime.record.manifest import operator_code_hash

        if layout.workflow_hash(self.graph.describe()) != self.record.manifest["workflow_hash"]:
            self.warnings.append(
                "the workflow differs from the recorded one (operators, columns or edges "
                "changed): replaying it anyway"
            )
        for name, info in self.record.operators.items():
            if name not in self.graph.nodes:
                continue
            op = self._config(name)
            cls = f"{type(op).__module__}:{type(op).__qualname__}"
            if cls != info["class"]:
                self.warnings.append(f"{name}: replaying {cls}, the run used {info['class']}")
            elif info.get("code_sha256") and operator_code_hash(op) != info["code_sha256"]:
                self.warnings.append(f"{name}: the code of {cls} changed since the run")

    def _config(self, name: str) -> Operator:
        return self.overrides.get(name, self.graph.nodes[name].operator)

    def instance(self, name: str, replica: int) -> Operator:
        """The operator set up as replica `replica` was in the run (name, seeds)."""
        key = (name, replica)
        if key not in self._instances:
            info = self.record.operators.get(name, {})
            node = self.graph.nodes[name]
            replicas = node.replicas
            if info.get("trains") and replicas > 1:
                replicas = 1  # data-parallel ranks replay as one process (see replay_update)
            op = copy.deepcopy(self._config(name))
            ctx = OperatorContext(
                name=name,
                replica=replica,
                num_replicas=replicas,
                seed=self.seed * 1000 + replica,
                run_dir=self.run_dir,
                worker="replay",
                run_seed=self.seed,
            )
            with self._threads(name):
                op.setup(ctx)
            self._instances[key] = op
            self._loaded[key] = None  # nothing loaded yet: its weights are setup's
        return self._instances[key]

    @contextmanager
    def _threads(self, name: str):
        import torch

        node = self.graph.nodes.get(name)
        wanted = self.threads or int((node.resources if node else {}).get("threads", 1))
        previous = torch.get_num_threads()
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    # -- weights ------------------------------------------------------------------------

    def _load_weights(self, name: str, replica: int, op: Operator, version: int | None) -> None:
        """Give a non-trainer replica the weights of `version`, as it had in the run."""
        info = self.record.operators.get(name, {})
        key = (name, replica)
        if version is None or not info.get("has_weights") or self._loaded.get(key) == version:
            return
        source = info.get("weights_from")
        if source is not None:
            tensors, _ = self.trainer_state(source, self.record.step_of_version(source, version))
            weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        elif info.get("prepared"):
            weights = self._warm_start()
        else:
            return  # weights of its own (built in setup): nothing was loaded in the run
        op.set_weights(version, weights)  # type: ignore[attr-defined]
        self._loaded[key] = version

    def _warm_start(self) -> dict[str, Any]:
        if self._warm is None:
            from safetensors.torch import load_file

            path = self.run_dir / "warmstart.safetensors"
            try:
                self._warm = load_file(str(path))
            except FileNotFoundError:
                raise RecordError(path, "missing: the prepared initial weights") from None
            except Exception as exc:
                raise RecordError(path, f"unreadable safetensors ({exc})") from None
        return self._warm

    # -- inputs -------------------------------------------------------------------------

    def inputs(self, step: StepRecord, d: DispatchRecord) -> pa.RecordBatch:
        """The micro-batch the replica was given, rebuilt from the record."""
        ids = step.output(d).column(layout.SAMPLE_ID)
        names = list(d.inputs) or [layout.SAMPLE_ID, *self.graph.nodes[d.operator].reads]
        table = step.columns([n for n in names if n != layout.SAMPLE_ID], ids.to_numpy())
        columns = {layout.SAMPLE_ID: table.column(layout.SAMPLE_ID)}
        columns |= {n: table.column(n) for n in table.column_names}
        order = names if layout.SAMPLE_ID in names else [layout.SAMPLE_ID, *names]
        arrays = [_one_chunk(columns[n]) for n in order]
        fields = [table.schema.field(n) for n in order]
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))

    # -- replay -------------------------------------------------------------------------

    def replay_operator(self, name: str, step: int) -> OperatorReplay:
        """Re-run operator `name` on every micro-batch it processed at `step`."""
        if name not in self.graph.nodes:
            raise AsyncflowError(
                f"replay: no operator {name!r}; the workflow has {', '.join(self.graph.order())}"
            )
        record = self.record.step(step)
        info = self.record.operators.get(name, {})
        if info.get("is_source"):
            return self.replay_source(step)
        report = OperatorReplay(name, step)
        dispatches = record.dispatches(name)
        if not dispatches:
            report.errors.append(f"{name} has no recorded micro-batch at step {step}")
            return report
        report.dispatches = len(dispatches)
        report.rows = sum(d.rows for d in dispatches)
        report.replicas = sorted({d.replica for d in dispatches})
        report.weight_versions = sorted({d.weight_version for d in dispatches} - {None})
        for i, d in enumerate(dispatches):
            for sample in record.output(d).column(layout.SAMPLE_ID).to_pylist():
                report.where[sample] = (i, d.replica, d.worker)
        with self._threads(name):
            if info.get("trains"):
                self._replay_update(name, record, dispatches, report)
            else:
                self._replay_outputs(name, record, dispatches, report)
        return report

    def _rebuilt_inputs(self, record, d, report) -> pa.RecordBatch:
        batch = self.inputs(record, d)
        if d.inputs_digest is not None:
            if layout.batch_digest(batch) == d.inputs_digest:
                report.inputs_verified += 1
            else:
                report.errors.append(
                    f"micro-batch seq {d.seq}: the inputs rebuilt from the record differ from "
                    "the ones the replica got (digest mismatch)"
                )
        return batch

    def _replay_outputs(self, name, record, dispatches, report) -> None:
        from asyncflow.runtime.contracts import check_output

        recorded, replayed = [], []
        for d in dispatches:
            op = self.instance(name, d.replica)
            batch = self._rebuilt_inputs(record, d, report)
            self._load_weights(name, d.replica, op, d.weight_version)
            ids = batch.column(layout.SAMPLE_ID)
            try:
                output = check_output(name, op.writes, op(batch), ids.to_pylist())
            except Exception as exc:
                report.errors.append(f"micro-batch seq {d.seq} ({d.rows} rows) raised {exc}")
                continue
            recorded.append(pa.Table.from_batches([record.output(d)]))
            replayed.append(_with_ids(output, ids))
        if recorded:
            report.replayed = pa.concat_tables(replayed, promote_options="default")
            report.columns = diff_tables(
                pa.concat_tables(recorded, promote_options="default"),
                report.replayed,
                self.tolerance,
            )
        if _has_end_step(self._config(name)):
            for replica in report.replicas:
                self.instance(name, replica).end_step(record.step)

    # -- trainer states -----------------------------------------------------------------

    def trainer_state(self, name: str, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The trainer's full state after `step`: from its keyframe on disk, or rebuilt from
        the nearest earlier one by replaying the recorded updates in between, each checked
        against the weights digest recorded for its step."""
        key = (name, step)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        on_disk = self.record.states(name)
        if step in on_disk and "meta" in on_disk[step]:
            return self._keep(key, self.record.state(name, step))
        bases = [s for s in on_disk if s < step and "meta" in on_disk[s]]
        bases += [s for (n, s) in self._states if n == name and s < step]
        if not bases:
            raise RecordError(
                layout.state_path(self.record.root, name, step),
                self.record._why_no_state(name, step)
                + ", and no earlier state of it is on disk to rebuild it from",
            )
        base = max(bases)
        state = self.trainer_state(name, base)
        with self._threads(name):
            for s in range(base + 1, step + 1):
                record = self.record.step(s)
                scratch = OperatorReplay(name, s)
                self._run_update(name, record, record.dispatches(name), state, scratch)
                if scratch.errors:
                    raise RecordError(record.dir, f"rebuilding {name}: {scratch.errors[0]}")
                state = self.instance(name, 0).checkpoint_state()  # type: ignore[attr-defined]
                recorded = self.record.versions(name).get(s, {}).get("digest")
                if recorded != layout.weights_digest(state[0]):
                    raise RecordError(
                        record.dir,
                        f"the state of {name!r} after step {s}, rebuilt from the keyframe "
                        f"after step {base}, does not match the recorded weights digest "
                        "(is the trainer deterministic? record with Recorder(state_every=1))",
                    )
                self._keep((name, s), state)
        return state

    def _keep(self, key, state):
        self._states[key] = state
        while len(self._states) > 8:  # a few, for replaying steps in order
            self._states.popitem(last=False)
        return state

    def _run_update(self, name, record, dispatches, before, report) -> dict[str, float] | None:
        """Restore `before`, feed the step's micro-batches in order, step; the metrics."""
        op = self.instance(name, 0)
        discard = getattr(op, "discard_step", None)
        if discard is not None:
            discard()
        tensors, meta = before  # copies: the optimizer would step the given tensors in place
        op.restore_state(  # type: ignore[attr-defined]
            {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)
        )
        for d in dispatches:
            batch = self._rebuilt_inputs(record, d, report)
            try:
                op(batch)
            except Exception as exc:
                report.errors.append(f"micro-batch seq {d.seq} ({d.rows} rows) raised {exc}")
                return None
        return op.end_step(record.step)

    def _replay_update(self, name, record, dispatches, report) -> None:
        ranks = self.graph.nodes[name].replicas
        step = record.step
        before = self.trainer_state(name, step - 1)
        report.weight_versions = [int(before[1]["version"])]
        if ranks > 1:
            report.notes.append(
                f"{ranks} data-parallel ranks replayed in one process: the gradient sum runs "
                "in another order, so compare within tolerance"
            )
        metrics = self._run_update(name, record, dispatches, before, report)
        if metrics is None:
            return
        recorded_metrics = record.end_step_metrics(name).get(0)
        if recorded_metrics is not None:
            report.metrics = compare_values(recorded_metrics, metrics, self.tolerance)
        else:
            report.notes.append(f"no end_step metrics recorded for {name} at step {step}")
        tensors, meta = self.instance(name, 0).checkpoint_state()  # type: ignore[attr-defined]
        recorded = self.record.versions(name).get(step)
        on_disk = self.record.states(name).get(step, {})
        if "meta" in on_disk:  # a keyframe: every tensor, optimizer moments included
            after, _ = self.record.state(name, step)
            report.state = compare_tensors(after, tensors, self.tolerance)
        elif recorded is not None and recorded.get("digest"):
            same = layout.weights_digest(tensors) == recorded["digest"]
            report.state = [
                ValueDiff(
                    "weights (sha256 digest)",
                    same,
                    0.0 if same else float("nan"),
                    note="" if same else "the weights differ from the recorded ones",
                )
            ]
        else:
            report.notes.append(f"no recorded state of {name} after step {step} to compare with")
            return
        if all(v.ok and v.max_abs_diff == 0 for v in report.state):
            self._keep((name, step), (tensors, meta))  # verified: later steps build on it

    def replay_source(self, step: int) -> OperatorReplay:
        name = self.record.source_name()
        record = self.record.step(step)
        report = OperatorReplay(name, step, dispatches=1, replicas=[0])
        recorded = record.source()
        report.rows = recorded.num_rows
        op = self.instance(name, 0)
        try:
            produced = op.produce(step, recorded.num_rows)  # type: ignore[attr-defined]
        except Exception as exc:
            report.errors.append(f"produce({step}, {recorded.num_rows}) raised {exc}")
            return report
        report.replayed = _with_ids(produced, recorded.column(layout.SAMPLE_ID))
        report.columns = diff_tables(recorded, report.replayed, self.tolerance)
        return report

    def replay_step(self, step: int) -> StepReplay:
        """The source and every operator of `step`, each on its recorded inputs, then the
        step's metrics recomputed from the replayed rows."""
        record = self.record.step(step)
        result = StepReplay(step)
        for name in self.graph.order():
            if name not in self.record.operators:
                continue
            if not self.record.operators[name].get("is_source") and not record.dispatches(name):
                result.notes.append(f"{name}: nothing recorded at step {step} (step cut short?)")
                continue
            result.operators.append(self.replay_operator(name, step))
        result.metrics = self._step_metrics(record, result)
        return result

    def replay_run(self, steps: list[int] | None = None) -> list[StepReplay]:
        return [self.replay_step(step) for step in (steps or self.record.steps())]

    def _step_metrics(self, record: StepRecord, result: StepReplay) -> list[ValueDiff]:
        if self.recipe is None or record.metrics is None:
            return []
        columns = list(self.recipe.metric_columns)
        replayed = self._replayed_columns(record, result, columns)
        if replayed is None:
            result.notes.append(
                "the step's metrics were not recomputed: an operator writing "
                f"{columns} did not replay completely"
            )
            return []
        values = dict(self.recipe.step_metrics(replayed))
        for report in result.operators:
            for m in report.metrics:
                values[m.name] = m.replayed
        recorded = {k: record.metrics[k] for k in values if k in record.metrics}
        return compare_values(recorded, {k: values[k] for k in recorded}, self.tolerance)

    def _replayed_columns(self, record, result, columns) -> pa.Table | None:
        """The step's metric columns as the replay produced them, in sample id order."""
        ids = np.sort(record.source().column(layout.SAMPLE_ID).to_numpy())
        out = {layout.SAMPLE_ID: pa.array(ids, pa.int64())}
        for column in columns:
            producer = self.record.producers.get(column)
            report = next((r for r in result.operators if r.operator == producer), None)
            if report is None or report.errors:
                return None
            table = report.replayed
            if table is None:
                return None
            at = pc.index_in(out[layout.SAMPLE_ID], value_set=table.column(layout.SAMPLE_ID))
            if at.null_count:
                return None
            out[column] = _one_chunk(table.column(column).take(at))
        return pa.table(out)


def compare_values(recorded: dict, replayed: dict, tol: Tolerance) -> list[ValueDiff]:
    out = []
    for name in sorted(set(recorded) | set(replayed)):
        a, b = recorded.get(name), replayed.get(name)
        if a is None or b is None:
            out.append(ValueDiff(name, False, float("nan"), a, b, "missing on one side"))
            continue
        diff = abs(float(a) - float(b)) if a != b else 0.0
        ok = diff == 0 or diff <= tol.atol + tol.rtol * abs(float(a))
        out.append(ValueDiff(name, ok, diff, a, b))
    return out


def compare_tensors(recorded: dict, replayed: dict, tol: Tolerance) -> list[ValueDiff]:
    import torch

    out = []
    for name in sorted(set(recorded) | set(replayed)):
        if name not in recorded or name not in replayed:
            out.append(ValueDiff(name, False, float("nan"), note="missing on one side"))
            continue
        a, b = recorded[name], replayed[name].to(recorded[name].dtype)
        if a.shape != b.shape:
            out.append(ValueDiff(name, False, float("nan"), note=f"shape {a.shape} vs {b.shape}"))
            continue
        if torch.equal(a, b):
            out.append(ValueDiff(name, True, 0.0))
            continue
        diff = (a.double() - b.double()).abs()
        ok = bool(torch.all(diff <= tol.atol + tol.rtol * a.double().abs()))
        count = int((diff > 0).sum())
        out.append(ValueDiff(name, ok, float(diff.max()), note=f"{count} of {a.numel()} differ"))
    return out


def _one_chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _with_ids(output: pa.RecordBatch | pa.Table, ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    table = pa.Table.from_batches([output]) if isinstance(output, pa.RecordBatch) else output
    if layout.SAMPLE_ID in table.column_names:
        table = table.drop_columns([layout.SAMPLE_ID])
    return table.add_column(0, layout.SAMPLE_ID, _one_chunk(ids).cast(pa.int64()))


def _has_end_step(operator: Operator) -> bool:
    return type(operator).end_step is not Operator.end_step
