"""Looking into a record: what it holds, one sample's lineage, a step's rows as Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from asyncflow.runtime.record import layout
from asyncflow.runtime.record.reader import RecordError, RunRecord


def summary(record: RunRecord) -> dict[str, Any]:
    """What the record holds: run facts, steps, operators, columns, states, problems."""
    m = record.manifest
    steps = []
    per_op: dict[str, dict[str, Any]] = {}
    for step in record.steps():
        s = record.step(step)
        dispatches = s.dispatches(effective=False)
        rows = [e for e in s.events if e.get("kind") == "rows"]
        versions: dict[str, list[int]] = {}
        for d in dispatches:
            op = per_op.setdefault(d.operator, {"micro_batches": 0, "rows": 0, "replicas": set()})
            op["micro_batches"] += 1
            op["rows"] += d.rows
            op["replicas"].add(d.replica)
            version = _version_used(record, d, step)
            if version is not None:
                versions.setdefault(d.operator, [])
                if version not in versions[d.operator]:
                    versions[d.operator].append(version)
        steps.append(
            {
                "step": step,
                "rows": rows[-1]["rows"] if rows else 0,
                "finished": s.complete,
                "micro_batches": len(dispatches),
                "weight_versions": versions,
            }
        )
    readers: dict[str, list[str]] = {}
    for op in record.workflow["operators"]:
        for column in op["reads"]:
            readers.setdefault(column, []).append(op["name"])
    columns = [
        {
            "column": column,
            "dtype": dtype,
            "written_by": op["name"],
            "read_by": readers.get(column, []),
        }
        for op in record.workflow["operators"]
        for column, dtype in op["writes"].items()
    ]
    operators = []
    for name in record.order():
        info = record.operators[name]
        seen = per_op.get(name, {})
        operators.append(
            {
                "operator": name,
                "class": info["class"].rsplit(":", 1)[-1],
                "replicas": info["replicas"],
                "micro_batches": seen.get("micro_batches", 0),
                "rows": seen.get("rows", 0),
                "trains": info["trains"],
                "is_source": info["is_source"],
                "weights_from": info.get("weights_from"),
                "writes": list(
                    next(o for o in record.workflow["operators"] if o["name"] == name)["writes"]
                ),
            }
        )
    trainers = [name for name, info in record.operators.items() if info["trains"]]
    segment = m["segments"][-1]
    return {
        "run_dir": str(record.run_dir),
        "workflow": m.get("workflow_name") or m["workflow"]["name"],
        "workflow_hash": m["workflow_hash"],
        "mode": segment["mode"],
        "max_staleness": segment.get("max_staleness", 0),
        "seed": m["recipe"]["seed"],
        "steps_planned": m["recipe"]["steps"],
        "status": record.status(),
        "size_bytes": record.size_bytes(),
        "cap_bytes": m.get("cap_bytes"),
        "evicted_steps": record.evicted(),
        "steps": steps,
        "operators": operators,
        "columns": columns,
        "states": {
            name: [
                {"step": step, "version": e.get("version"), "digest": e.get("digest")}
                for step, e in sorted(record.versions(name).items())
            ]
            for name in trainers
        },
        "keyframes": {name: sorted(record.states(name)) for name in trainers},
        "problems": record.check(),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"run record: {s['run_dir']}/record ({layout.format_size(s['size_bytes'])}, "
        f"cap {layout.format_size(s['cap_bytes'])})",
        f"workflow: {s['workflow']} ({s['workflow_hash'][:19]}...), {s['mode']} mode"
        + (f" (max staleness {s['max_staleness']})" if s["mode"] == "async" else "")
        + f", seed {s['seed']}, {s['steps_planned']} steps planned; run {s['status']}",
    ]
    steps = s["steps"]
    if steps:
        done = sum(st["finished"] for st in steps)
        lines.append(
            f"recorded steps: {steps[0]['step']}-{steps[-1]['step']} ({done} finished, "
            f"{len(steps) - done} cut short)"
            + (
                f"; dropped under the cap: {_span(s['evicted_steps'])}"
                if s["evicted_steps"]
                else ""
            )
        )
    else:
        lines.append("recorded steps: none")
    for name, kept in s["states"].items():
        if kept:
            frames = ", ".join(map(str, s["keyframes"].get(name, []))) or "none"
            lines.append(
                f"trainer states: {name} after steps {kept[0]['step']}..{kept[-1]['step']} "
                f"(weight versions {kept[0]['version']}..{kept[-1]['version']}, digests); "
                f"full states (keyframes) after steps {frames}"
            )
    lines += ["", "steps:"]
    rows = [["step", "rows", "finished", "micro-batches", "weight versions used"]]
    for st in steps:
        versions = ", ".join(
            f"{op} v{'/'.join(map(str, vs))}" for op, vs in st["weight_versions"].items()
        )
        rows.append(
            [
                st["step"],
                st["rows"],
                "yes" if st["finished"] else "NO",
                st["micro_batches"],
                versions,
            ]
        )
    lines += _table(rows)
    lines += ["", "operators:"]
    rows = [["operator", "class", "replicas", "micro-batches", "rows", "role", "writes"]]
    for op in s["operators"]:
        role = "source" if op["is_source"] else "trainer" if op["trains"] else ""
        if op["weights_from"]:
            role = f"weights from {op['weights_from']}"
        rows.append(
            [
                op["operator"],
                op["class"],
                op["replicas"],
                "-" if op["is_source"] else op["micro_batches"],
                "-" if op["is_source"] else op["rows"],
                role,
                ", ".join(op["writes"]) or "(no columns)",
            ]
        )
    lines += _table(rows)
    lines += ["", "columns:"]
    rows = [["column", "dtype", "written by", "read by"]]
    for c in s["columns"]:
        rows.append([c["column"], c["dtype"] or "any", c["written_by"], ", ".join(c["read_by"])])
    lines += _table(rows)
    if s["problems"]:
        lines += ["", "problems (the rest of the record is readable):"]
        lines += [f"  {p}" for p in s["problems"]]
    return "\n".join(lines)


# -- one sample ---------------------------------------------------------------------------


def lineage(record: RunRecord, sample_id: int, decode=None) -> dict[str, Any]:
    """Everything recorded about one sample: its source row, and for every operator the
    micro-batch it was in (replica, worker, weights, attempt) and the columns it wrote."""
    step = record.step_of_sample(sample_id)
    s = record.step(step)
    source = s.source()
    ids = source.column(layout.SAMPLE_ID).to_numpy()
    at = np.nonzero(ids == sample_id)[0]
    if not at.size:
        raise RecordError(s.dir, f"sample {sample_id} is not among step {step}'s final rows")
    source_name = record.source_name()
    out: dict[str, Any] = {"sample_id": sample_id, "step": step, "operators": []}
    row = {
        c: source.column(c)[int(at[0])].as_py()
        for c in source.column_names
        if c != layout.SAMPLE_ID
    }
    out["operators"].append({"operator": source_name, "source": True, "columns": row})
    for name in record.order():
        if name == source_name:
            continue
        dispatches = s.dispatches(name)
        for index, d in enumerate(dispatches):
            try:
                batch = s.output(d)
            except RecordError as exc:
                out.setdefault("problems", []).append(str(exc))
                continue
            batch_ids = batch.column(layout.SAMPLE_ID).to_numpy()
            where = np.nonzero(batch_ids == sample_id)[0]
            if not where.size:
                continue
            position = int(where[0])
            columns = {
                c: batch.column(c)[position].as_py()
                for c in batch.schema.names
                if c != layout.SAMPLE_ID
            }
            out["operators"].append(
                {
                    "operator": name,
                    "micro_batch": index,
                    "micro_batches": len(dispatches),
                    "rows": d.rows,
                    "position": position,
                    "replica": d.replica,
                    "worker": d.worker,
                    "weight_version": _version_used(record, d, step),
                    "attempt": d.attempt,
                    "busy_seconds": d.busy_seconds,
                    "trains": record.operators[name]["trains"],
                    "columns": columns,
                }
            )
            break
    for op in out["operators"]:
        if op.get("trains"):
            after = record.versions(op["operator"]).get(step)
            if after is not None:
                op["version_after_step"] = after.get("version")
    if decode is not None:
        for op in out["operators"]:
            op["text"] = {
                c: decode(v)
                for c, v in op["columns"].items()
                if c.endswith("_ids") and isinstance(v, list) and all(isinstance(x, int) for x in v)
            }
    return out


def format_lineage(info: dict[str, Any]) -> str:
    lines = [f"sample {info['sample_id']}: step {info['step']}"]
    for op in info["operators"]:
        if op.get("source"):
            lines.append(f"  {op['operator']} (source)")
        else:
            version = "" if op["weight_version"] is None else f", weights v{op['weight_version']}"
            attempt = f", attempt {op['attempt']}" if op["attempt"] else ""
            lines.append(
                f"  {op['operator']}: micro-batch {op['micro_batch'] + 1} of {op['micro_batches']} "
                f"({op['rows']} rows, row {op['position']}), replica {op['replica']} on "
                f"{op['worker']}{version}{attempt}"
            )
            if op.get("trains"):
                after = op.get("version_after_step")
                then = f" -> weights v{after}" if after is not None else ""
                lines.append(f"      trained on it in step {info['step']}{then}")
        for column, value in op["columns"].items():
            text = op.get("text", {}).get(column)
            shown = _short(value)
            lines.append(
                f"      {column} = {shown}" + (f"  ({text!r})" if text is not None else "")
            )
    for problem in info.get("problems", []):
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)


def find_decoder(record: RunRecord):
    """A tokenizer's `decode` from the recorded workflow, if it can be rebuilt (best effort)."""
    try:
        from asyncflow.runtime.record.replay import Replayer

        graph = Replayer(record.run_dir).graph
    except Exception:
        return None
    for node in graph.nodes.values():
        for attr in ("tokenizer", "tok"):
            tok = getattr(node.operator, attr, None)
            if tok is not None and callable(getattr(tok, "decode", None)):
                return tok.decode
    return None


def _version_used(record: RunRecord, d, step: int) -> int | None:
    """The weight version a dispatch ran with; a trainer's is that of its state after the
    previous step (its replicas do not track versions while training)."""
    if record.operators.get(d.operator, {}).get("trains"):
        return record.versions(d.operator).get(step - 1, {}).get("version")
    return d.weight_version


# -- export -------------------------------------------------------------------------------


def step_table(record: RunRecord, step: int) -> pa.Table:
    """One row per sample of `step`: `step`, every recorded column, and per operator where
    the row ran (`<op>_replica`, `<op>_worker`, `<op>_micro_batch`, `<op>_weight_version`)."""
    s = record.step(step)
    table = s.table()
    ids = table.column(layout.SAMPLE_ID).to_numpy()
    position = {int(i): k for k, i in enumerate(ids)}
    table = table.add_column(0, "step", pa.array(np.full(len(ids), step), pa.int64()))
    for name in record.order():
        dispatches = s.dispatches(name)
        if not dispatches:
            continue
        replica = np.full(len(ids), -1, dtype=np.int64)
        batch_no = np.full(len(ids), -1, dtype=np.int64)
        version = [None] * len(ids)
        worker = [None] * len(ids)
        for index, d in enumerate(dispatches):
            for sample in s.output(d).column(layout.SAMPLE_ID).to_pylist():
                k = position.get(sample)
                if k is None:
                    continue
                replica[k], batch_no[k], worker[k] = d.replica, index, d.worker
                version[k] = _version_used(record, d, step)
        missing = replica < 0
        table = table.append_column(f"{name}_replica", pa.array(replica, mask=missing))
        table = table.append_column(f"{name}_worker", pa.array(worker, pa.string()))
        table = table.append_column(f"{name}_micro_batch", pa.array(batch_no, mask=missing))
        if record.operators.get(name, {}).get("has_weights"):
            table = table.append_column(f"{name}_weight_version", pa.array(version, pa.int64()))
    return table


def export_step(record: RunRecord, step: int, path: str | Path) -> pa.Table:
    import pyarrow.parquet as pq

    table = step_table(record, step)
    pq.write_table(table, str(path))
    return table


# -- text helpers -------------------------------------------------------------------------


def _short(value: Any, width: int = 90) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        text = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _span(steps: list[int]) -> str:
    return f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])


def _table(rows: list[list[Any]]) -> list[str]:
    text = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(text[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in text
    ]
