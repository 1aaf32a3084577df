"""`asyncflow replay` and `asyncflow inspect`: the command line over run records."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asyncflow.runtime.record import layout


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `replay` and `inspect` on the `asyncflow` command's subparsers."""
    replay = sub.add_parser(
        "replay",
        help="re-run recorded operators on their recorded inputs and diff the outputs",
        description="Re-execute operators of a recorded run in this process, on exactly the "
        "micro-batches, weights and seeds they had, and compare their outputs with the "
        "recorded ones column by column (exact for integers and strings, --rtol/--atol for "
        "floats). Trainers: the update of the step, compared tensor by tensor. Exit status 1 "
        "when something differs.",
    )
    replay.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    replay.add_argument("--step", type=int, metavar="K", help="the step (default: every step)")
    replay.add_argument(
        "--operator", metavar="NAME", help="one operator (default: every operator of the step)"
    )
    replay.add_argument("--rtol", type=float, default=1e-5, help="float tolerance, relative")
    replay.add_argument("--atol", type=float, default=1e-6, help="float tolerance, absolute")
    replay.add_argument("--exact", action="store_true", help="floats too must be bit-identical")
    replay.add_argument(
        "--rows", type=int, default=5, metavar="N", help="differing rows shown per column"
    )
    replay.add_argument(
        "--threads", type=int, metavar="N", help="torch threads (default: as the run's replicas)"
    )
    replay.set_defaults(handler=cmd_replay)

    inspect = sub.add_parser(
        "inspect",
        help="list a recorded run's steps, operators and columns; trace a sample; export",
        description="Read RUN_DIR/record (Arrow IPC, JSON, safetensors; nothing is unpickled).",
    )
    inspect.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    inspect.add_argument(
        "--sample", type=int, metavar="ID", help="one sample's lineage across every operator"
    )
    inspect.add_argument(
        "--export-step",
        nargs=2,
        metavar=("K", "OUT.parquet"),
        help="write step K's rows (every column, plus where each row ran) to Parquet",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=cmd_inspect)


# -- inspect -----------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from asyncflow.runtime.record import inspection
    from asyncflow.runtime.record.reader import RunRecord

    record = RunRecord(args.run_dir)
    if args.export_step:
        step_text, out = args.export_step
        try:
            step = int(step_text)
        except ValueError:
            from asyncflow.errors import ConfigError

            raise ConfigError(f"--export-step {step_text!r}: K must be a step number") from None
        table = inspection.export_step(record, step, out)
        print(f"wrote {table.num_rows} rows x {table.num_columns} columns of step {step} to {out}")
        return 0
    if args.sample is not None:
        info = inspection.lineage(record, args.sample, inspection.find_decoder(record))
        print(
            json.dumps(info, indent=2, default=str)
            if args.json
            else inspection.format_lineage(info)
        )
        return 0
    summary = inspection.summary(record)
    print(
        json.dumps(summary, indent=2, default=str)
        if args.json
        else inspection.format_summary(summary)
    )
    return 0


# -- replay ------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from asyncflow.runtime.record.diff import Tolerance
    from asyncflow.runtime.record.replay import Replayer

    tolerance = Tolerance.exact() if args.exact else Tolerance(args.rtol, args.atol)
    replayer = Replayer(args.run_dir, tolerance=tolerance, threads=args.threads)
    record = replayer.record
    print(
        f"replaying {args.run_dir} ({record.workflow_name or record.workflow['name']}, "
        f"{record.mode} mode, seed {record.recipe['seed']}) in this process"
    )
    for warning in replayer.warnings:
        print(f"warning: {warning}")
    steps = [args.step] if args.step is not None else record.steps()
    if not steps:
        print("nothing to replay: the record has no steps")
        return 1
    reports, step_reports = [], []
    for step in steps:
        if args.operator is not None:
            reports.append(replayer.replay_operator(args.operator, step))
            print(format_operator(reports[-1], args.rows, verbose=True))
        else:
            result = replayer.replay_step(step)
            step_reports.append(result)
            reports += result.operators
            print(format_step(result, args.rows, verbose=len(steps) == 1))
        sys.stdout.flush()
    ok = all(r.ok for r in reports) and all(s.ok for s in step_reports)
    exact = ok and all(r.exact for r in reports) and all(s.exact for s in step_reports)
    bad = sum(not r.ok for r in reports) + sum(not m.ok for s in step_reports for m in s.metrics)
    if exact:
        print("result: every replayed output is identical to the recorded one")
    elif ok:
        print("result: every replayed output matches within tolerance")
    else:
        print(f"result: {bad} DIFFERENCE(S) between the replay and the record (see above)")
    return 0 if ok else 1


def format_operator(report, rows: int = 5, *, verbose: bool = True) -> str:
    what = "update" if report.state or report.metrics else ""
    head = f"step {report.step}, {report.operator}" + (f" ({what})" if what else "")
    facts = [f"{report.dispatches} micro-batch(es)", f"{report.rows} rows"]
    if report.replicas:
        facts.append("replica " + ",".join(map(str, report.replicas)))
    if report.weight_versions:
        facts.append("weights v" + ",".join(map(str, report.weight_versions)))
    if report.inputs_verified:
        facts.append(f"inputs verified {report.inputs_verified}/{report.dispatches}")
    lines = [f"{head}: {', '.join(facts)}"]
    for note in report.notes:
        lines.append(f"  note: {note}")
    for error in report.errors:
        lines.append(f"  ERROR: {error}")
    for column in report.columns:
        if verbose or not column.ok or column.status != "identical":
            lines.append(f"  {column.line()}")
        if column.examples and not column.ok:
            lines += _examples(report, column, rows)
    if report.state:
        changed = [v for v in report.state if v.max_abs_diff]
        bad = [v for v in report.state if not v.ok]
        if not changed:
            lines.append(f"  state after the step: {len(report.state)} tensors identical")
        else:
            worst = max(changed, key=lambda v: v.max_abs_diff)
            status = "DIFFERENT" if bad else "within tolerance"
            lines.append(
                f"  state after the step: {len(changed)} of {len(report.state)} tensors {status} "
                f"(largest: {worst.name}, max |diff| {worst.max_abs_diff:.3g})"
            )
            for v in bad[:rows]:
                lines.append(f"      {v.name}: max |diff| {v.max_abs_diff:.3g} {v.note}")
    if report.metrics:
        lines += _values("end_step metrics", report.metrics, verbose)
    if not verbose and report.ok and not report.errors:
        return lines[0] + ("  -> identical" if report.exact else "  -> within tolerance")
    lines.append(
        "  -> identical"
        if report.exact
        else "  -> within tolerance"
        if report.ok
        else "  -> DIFFERENT"
    )
    return "\n".join(lines)


def format_step(result, rows: int = 5, *, verbose: bool = True) -> str:
    lines = [format_operator(r, rows, verbose=verbose) for r in result.operators]
    lines += [f"step {result.step}: note: {n}" for n in result.notes]
    if result.metrics:
        lines += [
            line.replace("  ", f"step {result.step} ", 1) if i == 0 else line
            for i, line in enumerate(
                _values("metrics recomputed from the replayed rows", result.metrics, verbose)
            )
        ]
    return "\n".join(lines)


def _values(label: str, values, verbose: bool) -> list[str]:
    bad = [v for v in values if not v.ok]
    moved = [v for v in values if v.max_abs_diff]
    if not moved and not bad:
        return [f"  {label}: {len(values)} values identical"]
    status = "DIFFERENT" if bad else "within tolerance"
    lines = [f"  {label}: {len(moved or bad)} of {len(values)} {status}"]
    for v in (bad or moved)[: 8 if verbose else 3]:
        lines.append(f"      {v.name}: recorded {v.recorded!r}, replayed {v.replayed!r} {v.note}")
    return lines


def _examples(report, column, rows: int) -> list[str]:
    table = [["sample", "micro-batch", "replica", "recorded", "replayed"]]
    for sample, recorded, replayed in column.examples[:rows]:
        index, replica, _ = report.where.get(sample, (None, None, None))
        table.append(
            [
                str(sample),
                "?" if index is None else f"{index + 1} of {report.dispatches}",
                "?" if replica is None else str(replica),
                recorded,
                replayed,
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    out = []
    for r in table:
        out.append(
            "      "
            + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True))
            + "  "
            + r[4]
        )
    more = len(column.differing) - min(rows, len(column.examples))
    if more > 0:
        out.append(f"      ... and {more} more: samples {column.differing[:20]}")
    return out


def parse_cap(text: str) -> int | None:
    """`--record-cap` value -> bytes (None: no cap), with the CLI's error type."""
    from asyncflow.errors import ConfigError

    try:
        return layout.parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"--record-cap: {exc}") from None


# -- `asyncflow run` options -------------------------------------------------------------


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--no-record",
        action="store_true",
        help="do not record the run (RUN_DIR/record: every put, dispatch and trainer state, "
        "for `asyncflow replay` and `asyncflow inspect`; on by default)",
    )
    run.add_argument(
        "--record-cap",
        default=layout.DEFAULT_CAP,
        metavar="SIZE",
        help="size cap of the record, e.g. 500MB, 2GB, or none; the oldest finished steps "
        f"are dropped to stay under it (default {layout.DEFAULT_CAP})",
    )


def attach(args: argparse.Namespace, run_dir: Path, observers: list) -> None:
    """Append a `Recorder` to the run's observers unless --no-record."""
    if getattr(args, "no_record", False):
        return
    from asyncflow.runtime.record.recorder import Recorder

    cap = getattr(args, "record_cap", layout.DEFAULT_CAP)
    parse_cap(cap)  # a bad size fails before the cluster starts
    observers.append(Recorder(run_dir, cap=cap))
