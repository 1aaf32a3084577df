"""`python -m benchmarks` (or `asyncflow bench`): the quick version of every benchmark, one table.

Each benchmark runs as its own process (`--quick --json FILE`), one after the other, so
they never compete for the machine's cores; its JSON is read back and reduced to rows of
(metric, asyncflow, baseline, ratio, target, met). A benchmark whose optional dependency
is missing is skipped with the reason; one that fails shows as FAILED with the end of its
stderr, and the others still run. `--json OUT` keeps every benchmark's full JSON plus the
table in one file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # beside the scripts, which import it by name
    sys.path.insert(0, str(HERE))

from machine_info import one_line  # noqa: E402


@dataclass
class Row:
    benchmark: str
    metric: str
    asyncflow: str = ""
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: str = ""  # PASS / MISS / "" (no target) / SKIPPED / FAILED


Summarize = Callable[[dict[str, Any]], list[Row]]


@dataclass
class Benchmark:
    name: str
    script: str
    summarize: Summarize
    args: tuple[str, ...] = ("--quick",)
    requires: tuple[str, ...] = ()  # importable modules it needs, else skipped
    needs_note: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- one reducer per benchmark's JSON ------------------------------------------------------


def _targets(name: str, data: dict[str, Any]) -> list[Row]:
    """Benchmarks that list their own targets as [what, value, verdict-or-bool]."""
    rows = []
    for what, value, verdict in data.get("targets", []):
        met = verdict if isinstance(verdict, str) else _verdict(bool(verdict))
        rows.append(Row(name, what, asyncflow=str(value), target=what, met=met))
    return rows


def summarize_transfer_queue(data: dict[str, Any]) -> list[Row]:
    rows = []
    ours = {"put": "put_small_client_gibs_best", "get": "get_small_cross_gibs_best"}
    for verb, key in ours.items():
        ratio = data.get(f"transferqueue_{verb}_ratio_ours")
        if ratio is not None:
            rows.append(
                Row(
                    "transfer_queue",
                    f"{verb} GiB/s vs transferqueue (best of runs)",
                    asyncflow=f"{data[key]:.2f}",
                    baseline=f"{data[f'transferqueue_{verb}_gibs_best']:.2f}",
                    ratio=_x(ratio),
                )
            )
    if not rows and isinstance(data.get("transferqueue"), str):
        rows.append(Row("transfer_queue", data["transferqueue"][:120], met="SKIPPED"))
    return rows + _targets("transfer_queue", data)


def summarize_async_vs_sync(data: dict[str, Any]) -> list[Row]:
    return _targets("async_vs_sync", data)


def summarize_vs_trl(data: dict[str, Any]) -> list[Row]:
    systems, base = data["systems"], data.get("baseline") or "trl"
    rows = []
    for name, target in data["targets"].items():
        mine = systems[name]
        rows.append(
            Row(
                "vs_trl",
                f"{name} samples/s (baseline {base})",
                asyncflow=f"{mine['samples_per_s']:.1f}",
                baseline=f"{systems[base]['samples_per_s']:.1f}",
                ratio=_x(target["speedup"]),
                target=">= 2.0x",
                met=_verdict(target["speed_pass"]),
            )
        )
        rows.append(
            Row(
                "vs_trl",
                f"{name} mean reward",
                asyncflow=f"{mine['reward_mean']:.4f}",
                baseline=f"{systems[base]['reward_mean']:.4f}",
                target=f"not below by > {target['reward_tolerance']:.4f}",
                met=_verdict(target["reward_pass"]),
            )
        )
    return rows


def summarize_generation(data: dict[str, Any]) -> list[Row]:
    rows = []
    for key in sorted(k for k in data if k.startswith("ratio_ours_vs_hf_b")):
        batch = key.removeprefix("ratio_ours_vs_hf_b")
        rows.append(
            Row(
                "generation",
                f"sampling tokens/s, batch {batch} (same Qwen2)",
                asyncflow=f"{data[f'ours_hf_model_tokens_per_s_b{batch}']:.0f}",
                baseline=f"{data[f'hf_tokens_per_s_b{batch}']:.0f}",
                ratio=_x(data[key]),
            )
        )
    return rows


def summarize_observe(data: dict[str, Any]) -> list[Row]:
    ratio = data["ratio"]
    return [
        Row(
            "observe_overhead",
            "throughput with dashboard page + metrics / without",
            asyncflow=f"{data['median_samples_per_s']['on']:.0f}",
            baseline=f"{data['median_samples_per_s']['off']:.0f}",
            ratio=f"{ratio:.3f}",
            target=">= 0.97",
            met=_verdict(ratio >= 0.97),
        ),
        Row(
            "observe_overhead",
            "CPU per sample, on / off",
            ratio=f"{data['cpu_ratio']:.3f}",
        ),
    ]


def summarize_recording(data: dict[str, Any]) -> list[Row]:
    ratio = data["throughput_ratio"]
    return [
        Row(
            "recording_overhead",
            "throughput with recording / without",
            ratio=f"{ratio:.3f}",
            target=">= 0.95",
            met=_verdict(ratio >= 0.95),
        )
    ]


BENCHMARKS = (
    Benchmark("transfer_queue", "transfer_queue.py", summarize_transfer_queue),
    Benchmark("async_vs_sync", "async_vs_sync.py", summarize_async_vs_sync),
    Benchmark(
        "vs_trl",
        "vs_trl.py",
        summarize_vs_trl,
        requires=("trl", "transformers"),
        needs_note="pip install -e '.[bench-trl]'",
    ),
    Benchmark(
        "generation",
        "generation.py",
        summarize_generation,
        requires=("transformers",),
        needs_note="pip install -e '.[hf]'",
    ),
    Benchmark("observe_overhead", "observe_overhead.py", summarize_observe),
    Benchmark("recording_overhead", "recording_overhead.py", summarize_recording),
)


# -- running -------------------------------------------------------------------------------


def _missing(bench: Benchmark) -> list[str]:
    return [m for m in bench.requires if importlib.util.find_spec(m) is None]


def run_one(bench: Benchmark, work: Path, full: bool) -> tuple[list[Row], dict[str, Any]]:
    missing = _missing(bench)
    if missing:
        why = f"needs {', '.join(missing)}: {bench.needs_note}"
        return [Row(bench.name, why, met="SKIPPED")], {"skipped": why}
    out = work / f"{bench.name}.json"
    args = [a for a in bench.args if not (full and a == "--quick")]
    command = [sys.executable, str(HERE / bench.script), *args, "--json", str(out)]
    print(f"== {bench.name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, **bench.extra_env}
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        sys.stderr.write(proc.stderr[-4000:])
        return [Row(bench.name, f"exit {proc.returncode}: {tail}"[:200], met="FAILED")], {
            "failed": proc.returncode,
            "stderr_tail": proc.stderr[-4000:],
        }
    data = json.loads(out.read_text())
    try:
        rows = bench.summarize(data)
    except (KeyError, TypeError, ValueError) as exc:
        rows = [Row(bench.name, f"unreadable result: {exc!r}", met="FAILED")]
    return rows, {"elapsed_s": round(elapsed, 1), "result": data}


def render(rows: Sequence[Row]) -> str:
    head = ("benchmark", "metric", "asyncflow", "baseline", "ratio", "target", "met")
    cells = [head] + [
        (r.benchmark, r.metric, r.asyncflow, r.baseline, r.ratio, r.target, r.met) for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the quick version of every benchmark and print one table.",
    )
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--json", type=Path, metavar="OUT", help="every result and the table")
    parser.add_argument("--full", action="store_true", help="full versions (much longer)")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(names) if args.only else set()
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {names}")
    started = datetime.now(timezone.utc)
    rows: list[Row] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="asyncflow-bench-") as tmp:
        for bench in chosen:
            bench_rows, results[bench.name] = run_one(bench, Path(tmp), args.full)
            rows += bench_rows
    print()
    print(f"asyncflow benchmarks, {started:%Y-%m-%d %H:%M} UTC, {one_line()}")
    print(f"command: python -m benchmarks{' ' + ' '.join(argv or sys.argv[1:])}".rstrip())
    print(render(rows))
    if args.json:
        payload = {
            "date": started.isoformat(timespec="seconds"),
            "machine": one_line(),
            "table": [r.__dict__ for r in rows],
            "benchmarks": results,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 1 if any(r.met == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
