"""Recording overhead: the same GRPO workload with the run recorder on and off.

The workload is `make run`'s (32 prompts x 8 samples per step, micro-batches of 64, two
rollout replicas) on one embedded LocalCluster (2 worker processes), seeded, from one
shared warm start, so every arm does exactly the same computation: the only difference
is the `Recorder` at its default settings (every put, dispatch and trainer state
written, inputs digested, 2 GB cap). Two estimates, one invocation:

- alternating runs: whole runs with recording off and on, alternating (off, on, off,
  on, ...); throughput is samples / summed step time after the first step (the figure
  `asyncflow run` prints). Each pair's ratio is taken between runs minutes apart at
  most, and the median of the pair ratios is reported.
- interleaved steps (sync mode): one run recording every other step only. A recorded
  step's time runs to its end *plus* waiting for the writer to finish that step's files,
  so this charges all of the recorder's work to the steps it recorded: an upper bound.
  Neighbouring steps see the same machine load, which makes this the steadier estimate
  on a shared machine.

    python benchmarks/recording_overhead.py [--quick] [--json OUT] [--mode sync|async]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from asyncflow.runtime.events import RunObserver

TARGET = 0.05  # at most 5% of throughput


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--steps", type=int, help="steps per run (default 12, quick 8)")
    parser.add_argument("--pairs", type=int, help="off/on pairs of runs (default 5, quick 3)")
    args = parser.parse_args(argv)

    from asyncflow.operators.model import save_weights
    from asyncflow.runtime.cluster import ClusterConfig, connect
    from asyncflow.workflows import grpo

    steps = args.steps or (8 if args.quick else 12)
    pairs = args.pairs or (3 if args.quick else 5)
    interleaved_steps = 24 if args.quick else 40
    base = grpo.GRPOConfig(steps=steps, warmstart_steps=100 if args.quick else 300)
    work = Path(tempfile.mkdtemp(prefix="asyncflow-recording-bench-"))
    torch.set_num_threads(1)
    weights, _ = grpo.warm_start(base)  # once, shared by every run: the same start everywhere
    init = work / "warmstart.safetensors"
    save_weights(weights, base.model, init)
    cfg = replace(base, init=str(init))

    now = datetime.now(timezone.utc)
    print(f"asyncflow recording overhead benchmark, {now:%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, python "
        f"{platform.python_version()}, torch {torch.__version__}; load average {_load()}"
    )
    print(
        f"workload: grpo, {args.mode} mode, {cfg.prompts_per_step}x{cfg.group_size} rows per "
        f"step, micro-batch {cfg.micro_batch_size}; {pairs} off/on pairs of {steps}-step runs"
        + (f", then one {interleaved_steps}-step interleaved run" if args.mode == "sync" else "")
    )
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    interleaved = None
    with connect(ClusterConfig(n_workers=2)) as client:
        one_run(client, cfg, work / "warm-up", record=False, mode=args.mode)  # not counted
        for pair in range(pairs):
            for arm in ("off", "on"):
                r = one_run(client, cfg, work / f"{arm}-{pair}", record=arm == "on", mode=args.mode)
                runs[arm].append(r)
                extra = (
                    f", record {r['record_mb']:.1f} MB, writer {r['writer_cpu_ms_per_step']:.1f}"
                    " ms CPU/step"
                    if arm == "on"
                    else ""
                )
                print(
                    f"  pair {pair + 1}, recording {arm:>3}: {r['samples_per_s']:8.1f} samples/s,"
                    f" run {r['run_seconds']:.2f}s{extra}",
                    flush=True,
                )
        if args.mode == "sync":
            interleaved = interleaved_run(
                client, replace(cfg, steps=interleaved_steps), work / "interleaved"
            )

    result = summarise(runs)
    result["interleaved"] = interleaved
    print()
    header = f"{'estimate':<44} | {'off samples/s':>13} | {'on samples/s':>12} | on/off"
    print(header)
    print("-" * len(header))
    print(
        f"{f'alternating runs (median of {pairs} pairs)':<44} | "
        f"{result['off']['samples_per_s']:>13.1f} | {result['on']['samples_per_s']:>12.1f} | "
        f"{result['median_pair_ratio']:.3f}"
    )
    if interleaved is not None:
        print(
            f"{'interleaved steps (upper bound on the cost)':<44} | "
            f"{interleaved['off_samples_per_s']:>13.1f} | "
            f"{interleaved['on_samples_per_s']:>12.1f} | {interleaved['ratio']:.3f}"
        )
    on = result["on"]
    print(
        f"\nrecorder cost per step (median): writer thread {on['writer_cpu_ms_per_step']:.1f} ms "
        f"CPU, hooks {on['hook_ms_per_step']:.2f} ms on the driver, for a {on['step_ms']:.0f} ms "
        f"step; record {on['record_mb']:.1f} MB for {steps} steps"
    )
    print("pair ratios: " + " ".join(f"{r:.3f}" for r in result["pair_ratios"]))
    headline = interleaved["ratio"] if interleaved is not None else result["median_pair_ratio"]
    overhead = max(0.0, 1.0 - headline)
    result["throughput_ratio"], result["overhead"] = headline, overhead
    print(
        f"throughput with recording / without: {headline:.3f} (overhead {100 * overhead:.1f}%; "
        f"target <= {100 * TARGET:.0f}%: {'PASS' if overhead <= TARGET else 'MISS'})"
    )
    print(f"load average at the end: {_load()}")
    if args.json:
        meta = {
            "date": now.isoformat(),
            "mode": args.mode,
            "steps": steps,
            "pairs": pairs,
            "rows_per_step": cfg.prompts_per_step * cfg.group_size,
            "micro_batch_size": cfg.micro_batch_size,
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        }
        Path(args.json).write_text(json.dumps({**meta, **result, "runs": runs}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _executor(client, recipe, run_dir: Path, observers: list, mode: str):
    from asyncflow.runtime.executor import SyncExecutor
    from asyncflow.runtime.report import RunReporter
    from asyncflow.runtime.streaming import AsyncExecutor

    reporter = RunReporter(run_dir, recipe.steps, stream=io.StringIO())  # quiet
    executor_type = AsyncExecutor if mode == "async" else SyncExecutor
    return executor_type(recipe, client, run_dir, observers=observers, reporter=reporter)


def _recipe(cfg, run_dir: Path):
    from asyncflow.workflows import grpo

    run_dir.mkdir(parents=True, exist_ok=True)
    return replace(grpo.recipe(cfg, run_dir), evaluate=None)  # the training loop only


def one_run(client, cfg, run_dir: Path, *, record: bool, mode: str) -> dict:
    from asyncflow.runtime.record import Recorder
    from asyncflow.runtime.record.reader import RunRecord

    recipe = _recipe(cfg, run_dir)
    observers = [Recorder(run_dir)] if record else []
    start = time.perf_counter()
    result = _executor(client, recipe, run_dir, observers, mode).run()  # flush included
    run_seconds = time.perf_counter() - start
    history = result.history[1:]  # the first step warms up the replicas
    samples = sum(r["samples"] for r in history)
    seconds = sum(r["step_time"] for r in history)
    out = {"samples_per_s": samples / seconds, "run_seconds": run_seconds}
    if record:
        out["record_mb"] = RunRecord(run_dir).size_bytes() / 1e6
        stats = observers[0].stats()
        out["writer_cpu_ms_per_step"] = 1e3 * stats["writer_cpu_seconds"] / recipe.steps
        out["hook_ms_per_step"] = 1e3 * stats["hook_seconds"] / recipe.steps
        out["step_ms"] = 1e3 * sum(r["step_time"] for r in result.history) / recipe.steps
    return out


class EveryOtherStep(RunObserver):
    """Records odd steps only, and waits for the writer at the end of each: the recorded
    steps' wall time then includes all the recorder's work for them."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.walls: dict[int, float] = {}
        self.samples: dict[int, int] = {}
        self._last = time.perf_counter()

    @staticmethod
    def on(step: int) -> bool:
        return step % 2 == 1

    def run_started(self, info) -> None:
        self.recorder.run_started(info)
        self._last = time.perf_counter()

    def rows_added(self, step, rows) -> None:
        if self.on(step):
            self.recorder.rows_added(step, rows)

    def dispatched(self, dispatch) -> None:
        if self.on(dispatch.step):
            self.recorder.dispatched(dispatch)

    def step_ended(self, operator, replica, step, metrics) -> None:
        if self.on(step):
            self.recorder.step_ended(operator, replica, step, metrics)

    def state_saved(self, operator, step, tensors, meta) -> None:
        if self.on(step) or self.on(step + 1):  # the state a recorded update starts from
            self.recorder.state_saved(operator, step, tensors, meta)

    def step_finished(self, record) -> None:
        step = record["step"]
        if self.on(step):
            self.recorder.step_finished(record)
            self.recorder.flush()
        now = time.perf_counter()
        self.walls[step], self._last = now - self._last, now
        self.samples[step] = record["samples"]

    def run_finished(self, summary) -> None:
        self.recorder.run_finished(summary)


def interleaved_run(client, cfg, run_dir: Path) -> dict:
    from asyncflow.runtime.record import Recorder

    recipe = _recipe(cfg, run_dir)
    probe = EveryOtherStep(Recorder(run_dir))
    _executor(client, recipe, run_dir, [probe], "sync").run()
    steps = sorted(k for k in probe.walls if k >= 2)  # after the warm-up steps
    arms = {arm: [k for k in steps if probe.on(k) == (arm == "on")] for arm in ("off", "on")}
    rate = {
        arm: sum(probe.samples[k] for k in ks) / sum(probe.walls[k] for k in ks)
        for arm, ks in arms.items()
    }
    return {
        "steps": len(steps),
        "off_samples_per_s": rate["off"],
        "on_samples_per_s": rate["on"],
        "ratio": rate["on"] / rate["off"],
        "walls": probe.walls,
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for arm, rs in runs.items():
        out[arm] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
            "run_seconds": statistics.median(r["run_seconds"] for r in rs),
        }
        if arm == "on":
            for key in ("record_mb", "writer_cpu_ms_per_step", "hook_ms_per_step", "step_ms"):
                out[arm][key] = statistics.median(r[key] for r in rs)
    out["pair_ratios"] = [
        on["samples_per_s"] / off["samples_per_s"]
        for off, on in zip(runs["off"], runs["on"], strict=True)
    ]
    out["median_pair_ratio"] = statistics.median(out["pair_ratios"])
    return out


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
