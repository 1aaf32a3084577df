"""What watching a run costs: the same GRPO workload with the observers on and off.

One invocation, one LocalCluster (2 worker processes), runs alternating off/on so both
see the same machine state. "on" is everything `asyncflow run` adds: the live state,
the dashboard publisher (pushes about once a second, per-operator Dask spans metered
on the workers), dispatches.jsonl, progress output (quiet here: the terminal is not
what is measured). Both write metrics.jsonl and metrics.csv (the RunReporter always does).

Throughput of a run = samples / summed step time over its steps after the first
(warm start, evaluation and the first step's one-off costs excluded); its CPU cost =
CPU seconds of the driver process (executor, client and, on the embedded cluster, the
scheduler) plus every worker process over the same steps, per sample. The table shows
medians over repeats and the on/off ratios; the target is <= 3% overhead. On a shared
machine wall time swings by tens of percent between identical runs, so the script also
times the observers directly: seconds inside their hooks on the executor's threads and
in the publisher's pushes (its own thread), as a share of step time.

    python benchmarks/observe_overhead.py [--quick] [--mode sync|async] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from asyncflow.runtime.cluster import ClusterConfig, connect
from asyncflow.runtime.events import RunObserver
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.observe.files import DispatchLog
from asyncflow.runtime.observe.live import LiveState
from asyncflow.runtime.observe.publish import DashboardPublisher
from asyncflow.runtime.report import RunReporter, read_metrics
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import grpo

HOOKS = (
    "run_started",
    "rows_added",
    "dispatched",
    "step_ended",
    "weights_published",
    "weights_loaded",
    "state_saved",
    "step_finished",
    "recovered",
    "run_finished",
)


class Timed(RunObserver):
    """Wraps an observer and adds up the time its hooks take (thread-safe enough: GIL)."""

    def __init__(self, inner: RunObserver, totals: dict[str, float]):
        self.inner, self.totals = inner, totals

    def __getattribute__(self, name):
        if name in HOOKS:
            inner, totals = (
                object.__getattribute__(self, "inner"),
                object.__getattribute__(self, "totals"),
            )
            hook = getattr(inner, name)

            def timed(*args):
                start = time.perf_counter()
                try:
                    return hook(*args)
                finally:
                    totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

            return timed
        return object.__getattribute__(self, name)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuProbe(RunObserver):
    """CPU seconds of the driver process (executor, client and, on our embedded cluster,
    the scheduler) and of every worker process, between the end of the first step and
    the end of the last: unlike wall time, barely moved by other load on the machine."""

    def __init__(self, client, last_step: int):
        self.client, self.last_step, self.marks = client, last_step, []

    def step_finished(self, record):
        if record["step"] in (0, self.last_step):
            workers = self.client.run(_cpu_seconds)
            self.marks.append((_cpu_seconds(), sum(workers.values())))

    def seconds(self) -> tuple[float, float]:
        (d0, w0), (d1, w1) = self.marks
        return d1 - d0, w1 - w0


def one_run(client, cfg, mode: str, observe: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="observe-overhead-"))
    recipe = grpo.recipe(cfg, run_dir)
    reporter = RunReporter(run_dir, recipe.steps, progress="quiet")
    totals: dict[str, float] = {}
    observers: list[RunObserver] = []
    publisher = None
    if observe:
        live = LiveState()
        publisher = DashboardPublisher(live)
        observers = [Timed(o, totals) for o in (DispatchLog(run_dir), live, publisher)]
    probe = CpuProbe(client, cfg.steps - 1)
    observers.append(probe)
    kind = AsyncExecutor if mode == "async" else SyncExecutor
    extra = {"max_staleness": 1} if mode == "async" else {}
    kind(recipe, client, run_dir, reporter=reporter, observers=observers, **extra).run()
    every = read_metrics(run_dir)
    records = every[1:]  # the first step pays one-off costs
    seconds = sum(r["step_time"] for r in records)
    samples = sum(r["samples"] for r in records)
    per_step = {k: v for k, v in totals.items() if k not in ("run_started", "run_finished")}
    dispatches = 0
    if observe:
        with open(run_dir / "dispatches.jsonl", encoding="utf-8") as f:
            dispatches = sum(1 for line in f if '"dispatch"' in line)
    driver_cpu, worker_cpu = probe.seconds()
    return {
        "observe": observe,
        "samples_per_s": samples / seconds,
        "cpu_ms_per_sample": 1e3 * (driver_cpu + worker_cpu) / samples,
        "driver_cpu_ms_per_sample": 1e3 * driver_cpu / samples,
        "step_seconds": seconds,
        "samples": samples,
        # time in hooks during the steps (run_started/run_finished are once, outside them)
        "hook_seconds": sum(per_step.values()),
        "all_step_seconds": sum(r["step_time"] for r in every),
        "hooks": totals,
        "dispatches": dispatches,
        "pushes": publisher.pushes if publisher else 0,
        "push_seconds": publisher.push_seconds if publisher else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (CI)")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--repeats", type=int, help="runs per setting (default 3, quick 2)")
    parser.add_argument("--steps", type=int, help="steps per run (default 16, quick 6)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    steps = args.steps or (6 if args.quick else 16)
    cfg = replace(
        grpo.GRPOConfig(), steps=steps, prompts_per_step=16, group_size=8, warmstart_steps=20
    )
    runs: list[dict] = []
    with connect(ClusterConfig(n_workers=2, dashboard_address="127.0.0.1:0")) as client:
        one_run(client, replace(cfg, steps=2), args.mode, True)  # warm-up, not counted
        for i in range(repeats):
            for observe in (False, True) if i % 2 == 0 else (True, False):
                run = one_run(client, cfg, args.mode, observe)
                runs.append(run)
                print(
                    f"  run {len(runs)}: observers {'on ' if observe else 'off'} "
                    f"{run['samples_per_s']:8.1f} samples/s",
                    file=sys.stderr,
                    flush=True,
                )
    off = [r for r in runs if not r["observe"]]
    on = [r for r in runs if r["observe"]]
    med_off = statistics.median(r["samples_per_s"] for r in off)
    med_on = statistics.median(r["samples_per_s"] for r in on)
    # adjacent on/off runs share the machine's state best: the median of their ratios
    pairs = [
        on_run["samples_per_s"] / off_run["samples_per_s"]
        for i in range(0, len(runs) - 1, 2)
        for on_run, off_run in [sorted(runs[i : i + 2], key=lambda r: not r["observe"])]
    ]
    ratio = statistics.median(pairs)
    accounted = statistics.median(
        (r["hook_seconds"] + r["push_seconds"]) / r["all_step_seconds"] for r in on
    )
    hook_share = statistics.median(r["hook_seconds"] / r["all_step_seconds"] for r in on)
    per_dispatch = statistics.median(
        r["hooks"].get("dispatched", 0.0) / max(r["dispatches"], 1) for r in on
    )
    per_push = statistics.median(r["push_seconds"] / max(r["pushes"], 1) for r in on)

    cpu_off = statistics.median(r["cpu_ms_per_sample"] for r in off)
    cpu_on = statistics.median(r["cpu_ms_per_sample"] for r in on)

    def row(name: str, group: list[dict], median: float, cpu: float) -> tuple[str, ...]:
        each = ", ".join(f"{r['samples_per_s']:.0f}" for r in group)
        cpus = ", ".join(f"{r['cpu_ms_per_sample']:.3f}" for r in group)
        return (name, str(len(group)), f"{median:.1f}", each, f"{cpu:.3f}", cpus)

    rows = [
        ("observers", "runs", "samples/s (median)", "each run", "CPU ms/sample (median)",
         "each run"),
        row("off", off, med_off, cpu_off),
        row("on", on, med_on, cpu_on),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(
        f"observe overhead: grpo, {args.mode} mode, {steps} steps x "
        f"{cfg.prompts_per_step * cfg.group_size} samples, {repeats} repeats"
    )
    print(line(rows[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]:
        print(line(r))
    print(
        f"CPU per sample on/off: {cpu_on / cpu_off:.3f}, overhead "
        f"{100 * (cpu_on / cpu_off - 1):+.1f}% (driver + scheduler + workers; target <= 3%)"
    )
    each_pair = ", ".join(f"{p:.3f}" for p in pairs)
    print(
        f"wall-clock throughput ratio on/off (median of adjacent pairs {each_pair}): "
        f"{ratio:.3f}, overhead {100 * (1 - ratio):+.1f}% (target <= 3%); "
        f"medians alone: {med_on / med_off:.3f}"
    )
    print(
        f"observer hooks on the executor's threads: {100 * hook_share:.2f}% of step time, "
        f"{1e6 * per_dispatch:.0f} us per dispatched micro-batch; "
        f"publisher: {1e3 * per_push:.1f} ms per push on its own thread; "
        f"hooks + pushes = {100 * accounted:.2f}% of step time"
    )
    if args.json:
        result = {
            "benchmark": "observe_overhead",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
            "mode": args.mode,
            "steps": steps,
            "repeats": repeats,
            "samples_per_step": cfg.prompts_per_step * cfg.group_size,
            "median_samples_per_s": {"off": med_off, "on": med_on},
            "ratio": ratio,
            "cpu_ms_per_sample": {"off": cpu_off, "on": cpu_on},
            "cpu_ratio": cpu_on / cpu_off,
            "pair_ratios": pairs,
            "ratio_of_medians": med_on / med_off,
            "accounted_share_of_step_time": accounted,
            "hook_share_of_step_time": hook_share,
            "hook_seconds_per_dispatch": per_dispatch,
            "push_seconds": per_push,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
