"""Async vs sync, each pair measured in one run, on the real runtime.

    python benchmarks/async_vs_sync.py [--quick] [--json OUT] [--only sim|real]

(1) A cluster-scale **simulated workload** (`asyncflow/workflows/simulated.py`): the real
    executors, TransferQueue and Dask actors, with operators whose cost is modelled
    (they sleep): long-tail lognormal response lengths, a rollout micro-batch as long as
    its longest response, 16 to 64 virtual rollout workers (replicas), ref and reward
    stages, one trainer replica standing for a data-parallel group. For each layout:
    sync and async (max staleness 1) samples/s, the async/sync ratio, and efficiency
    against the bottleneck-stage bound (exact for the rows drawn, no runtime overhead);
    plus the zero-overhead model of the async executor's own schedule, to split the gap
    to the bound into "policy" (staleness bound, pipeline fill and drain) and "runtime"
    (actor calls, dispatch, queue, step boundaries), and per-stage probes.
(2) The **real** tiny-LM GRPO run on this CPU (`asyncflow run grpo`'s recipe), sync and
    async (max staleness 1) from the same warm start (the first run's, seed 0) and the same
    RL seed: samples/s over the steps (set-up, warm start and evaluation excluded), reward
    against samples seen for both, held-out accuracy before/after, and a noise estimate
    (per-step reward spread over the last quarter of the run; with two RL seeds in the
    full run, also the seed-to-seed spread).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from machine_info import describe

from asyncflow.runtime.events import RunObserver
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.observe.files import DispatchLog
from asyncflow.runtime.report import RunReporter, read_metrics
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import simulated as sim

# Layouts of the simulated workload: virtual workers per stage (replicas), 4 rollout
# micro-batches of 8 rows per rollout worker per step, trainer group scaled with the rollout.
LAYOUTS = {
    "sim-16": sim.SimConfig(
        rollout_replicas=16, ref_replicas=8, reward_replicas=8, train_workers=8, groups_per_step=64
    ),
    "sim-32": sim.SimConfig(
        rollout_replicas=32, ref_replicas=8, reward_replicas=8, train_workers=16
    ),
    "sim-64": sim.SimConfig(
        rollout_replicas=64,
        ref_replicas=16,
        reward_replicas=8,
        train_workers=32,
        groups_per_step=256,
    ),
}
# the same 64-worker layout with every cost twice as long: half the actor calls per second
LAYOUTS["sim-64/2x"] = dataclasses.replace(LAYOUTS["sim-64"], cost=sim.CostModel().scaled(2.0))


@dataclasses.dataclass(frozen=True)
class Settings:
    layouts: tuple[str, ...]
    sim_steps: int
    staleness: tuple[int, ...]  # async runs of the simulated workload
    real_steps: int
    seeds: tuple[int, ...]


QUICK = Settings(("sim-32",), 8, (1,), 40, (0,))
FULL = Settings(("sim-16", "sim-32", "sim-64", "sim-64/2x"), 12, (1,), 150, (0, 1))
TARGET_RATIO, TARGET_EFFICIENCY = 2.0, 0.90
LONG_RUN_STEPS = 50  # for the zero-overhead model's long-run efficiency


# -- probes ---------------------------------------------------------------------------------


class Probe(RunObserver):
    """Driver-side record of every micro-batch, step and weight load (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int, int, float, float, float, int]] = []
        self.step_done: dict[int, float] = {}
        self.rows_at: dict[int, float] = {}
        self.trainer_stepped: dict[int, float] = {}
        self.loads = 0

    def rows_added(self, step, rows) -> None:
        with self.lock:
            self.rows_at[step] = time.time()

    def dispatched(self, d) -> None:
        with self.lock:
            self.calls.append(
                (
                    d.operator,
                    d.replica,
                    d.step,
                    d.started,
                    d.finished,
                    d.busy_seconds,
                    len(d.sample_ids),
                )
            )

    def step_ended(self, operator, replica, step, metrics) -> None:
        with self.lock:
            self.trainer_stepped[step] = time.time()

    def weights_loaded(self, operator, replica, version) -> None:
        with self.lock:
            self.loads += 1

    def step_finished(self, record) -> None:
        with self.lock:
            self.step_done[record["step"]] = time.time()

    def boundary(self, staleness: int) -> dict[str, float]:
        """Async step boundary, median ms: the trainer's last micro-batch of step k back ->
        end_step done (all ranks) -> step k + s + 1's rows in the queue (snapshot, weights
        published, source call, add_rows). Rollouts that ran out of eligible rows wait
        for exactly this."""
        last = defaultdict(float)
        for call in self.calls:
            if call[0] == "actor":
                last[call[2]] = max(last[call[2]], call[4])
        steps = [k for k in last if k in self.trainer_stepped and k + staleness + 1 in self.rows_at]
        if not steps:
            return {}
        end = [self.trainer_stepped[k] - last[k] for k in steps]
        feed = [self.rows_at[k + staleness + 1] - self.trainer_stepped[k] for k in steps]
        return {"end_step_ms": 1e3 * float(np.median(end)), "feed_ms": 1e3 * float(np.median(feed))}

    def stages(self, cfg: sim.SimConfig, mode: str) -> dict[str, dict[str, float]]:
        """Per stage over the run: utilisation, per-call overhead, dispatch gaps."""
        start = min(self.rows_at.values())
        end = max(self.step_done.values())
        by_stage: dict[str, list] = defaultdict(list)
        for call in self.calls:
            by_stage[call[0]].append(call)
        out = {}
        for stage in cfg.stages():
            calls = sorted(by_stage[stage], key=lambda c: c[3])
            if not calls:
                continue
            replicas = cfg.replicas(stage)
            busy = sum(c[5] for c in calls)
            if stage == "actor":
                busy += cfg.cost.train_step_s * len(self.step_done)  # end_step (not a call)
            overhead = np.array([c[4] - c[3] - c[5] for c in calls])
            per_replica: dict[int, list] = defaultdict(list)
            for c in calls:
                per_replica[c[1]].append(c)
            gaps = np.array(
                [b[3] - a[4] for cs in per_replica.values() for a, b in itertools.pairwise(cs)]
                or [0.0]
            )
            span = (end - start) * replicas
            out[stage] = {
                "calls": len(calls),
                "rows_per_call": float(np.mean([c[6] for c in calls])),
                "busy_s": busy,
                "utilisation": busy / span,
                # sent -> result back on the driver, minus the operator's own time: actor
                # RPC both ways, (de)serialisation, output checks, the replica's thread hop
                "call_overhead_ms_p50": 1e3 * float(np.median(overhead)),
                "call_overhead_ms_mean": 1e3 * float(np.mean(overhead)),
                "call_overhead_share": float(np.sum(overhead)) / span,
                # previous result back -> next call sent, per replica: dispatch latency
                # when work was waiting, starvation when it was not
                "gap_ms_p50": 1e3 * float(np.median(gaps)),
                "gap_share": float(np.sum(gaps)) / span,
            }
        return out


@contextlib.contextmanager
def cpu_meter(client):
    """CPU seconds used by this process (driver + scheduler) and by each worker."""
    import psutil

    def worker_cpu() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system

    me = psutil.Process()
    result: dict[str, float] = {}
    before_w = client.run(worker_cpu)
    before_d = sum(me.cpu_times()[:2])
    t0 = time.perf_counter()
    yield result
    wall = time.perf_counter() - t0
    after_w = client.run(worker_cpu)
    result["driver_cores"] = (sum(me.cpu_times()[:2]) - before_d) / wall
    for i, w in enumerate(sorted(after_w)):
        result[f"worker{i}_cores"] = (after_w[w] - before_w[w]) / wall


def quiet_reporter(run_dir: Path, steps: int) -> RunReporter:
    return RunReporter(run_dir, steps, stream=io.StringIO())


# -- (1) the simulated workload ------------------------------------------------------------


def run_sim(client, name: str, cfg: sim.SimConfig, mode: str, staleness: int, root: Path):
    run_dir = root / f"{name.replace('/', '-')}-{mode}{staleness if mode == 'async' else ''}"
    recipe = sim.recipe(cfg)
    probe = Probe()
    run_dir.mkdir(parents=True, exist_ok=True)
    # dispatches.jsonl (both modes alike): the operator timeline benchmarks/plots.py draws
    options = {
        "observers": [probe, DispatchLog(run_dir)],
        "reporter": quiet_reporter(run_dir, cfg.steps),
    }
    if mode == "sync":
        executor = SyncExecutor(recipe, client, run_dir, **options)
    else:
        executor = AsyncExecutor(recipe, client, run_dir, max_staleness=staleness, **options)
    with cpu_meter(client) as cpu:
        result = executor.run()
    metrics = read_metrics(run_dir)
    ledger = result.trained.get("actor", {})
    trained = [i for ids in ledger.values() for i in ids]
    exactly_once = len(trained) == len(set(trained)) == cfg.steps * cfg.rows_per_step
    del executor, result
    gc.collect()

    samples = sum(m["samples"] for m in metrics)
    seconds = sum(m["step_time"] for m in metrics)
    bound = sim.bottleneck_bound(cfg, range(cfg.steps))
    rate = samples / seconds
    stages = probe.stages(cfg, mode)
    row: dict[str, Any] = {
        "layout": name,
        "mode": mode if mode == "sync" else f"async S={staleness}",
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": rate,
        "step_time_mean": seconds / len(metrics),
        "bound_samples_per_s": bound["samples_per_s"],
        "bottleneck": bound["bottleneck"],
        "capacity": bound["capacity"],
        "efficiency": rate / bound["samples_per_s"],
        "staleness_mean": float(np.mean([m.get("staleness/mean", 0.0) for m in metrics])),
        "staleness_max": float(max(m.get("staleness/max", 0.0) for m in metrics)),
        "exactly_once": exactly_once,
        "weight_loads": probe.loads,
        "calls_per_s": len(probe.calls) / seconds,
        "train_step_s": cfg.cost.train_step_s,
        "cpu": cpu,
        "stages": stages,
        # fidelity: the operators' measured busy time / the model's work (1.0 = exact)
        "busy_vs_model": {k: v["busy_s"] / bound["work_seconds"][k] for k, v in stages.items()},
        "boundary": probe.boundary(staleness) if mode == "async" else {},
        "steps": metrics,
    }
    lengths = [sim.response_lengths(cfg, k) for k in range(cfg.steps)]
    if mode == "sync":
        model = [sim.sync_step_model(cfg, x) for x in lengths]
        model_time = sum(m["total"] for m in model)
        row["model_samples_per_s"] = samples / model_time
        row["breakdown"] = {
            s: {
                "measured_s": float(np.mean([m[f"time/{s}"] for m in metrics])),
                "share": sum(m[f"time/{s}"] for m in metrics) / seconds,
                "model_s": float(np.mean([m.get(s, 0.0) for m in model])),
                "model_share": sum(m.get(s, 0.0) for m in model) / model_time,
            }
            for s in ("prompts", *cfg.stages(), "weight_sync")
        }
    else:
        finish = sim.async_schedule_model(cfg, range(cfg.steps), staleness)
        row["model_samples_per_s"] = samples / finish[cfg.steps - 1]
        # the same policy over a long run: fill and drain amortised
        long = range(LONG_RUN_STEPS)
        finish = sim.async_schedule_model(cfg, long, staleness)
        long_bound = sim.bottleneck_bound(cfg, long)
        row["model_long_run_efficiency"] = (
            long_bound["samples"] / finish[LONG_RUN_STEPS - 1] / long_bound["samples_per_s"]
        )
    row["model_efficiency"] = row["model_samples_per_s"] / bound["samples_per_s"]
    row["runtime_efficiency"] = rate / row["model_samples_per_s"]  # measured / zero overhead
    return row


def bench_sim(settings: Settings, root: Path) -> list[dict[str, Any]]:
    from asyncflow.runtime.cluster import ClusterConfig, connect

    rows = []
    with connect(ClusterConfig(n_workers=2, dashboard_address="127.0.0.1:0")) as client:
        for name in settings.layouts:
            cfg = dataclasses.replace(LAYOUTS[name], steps=settings.sim_steps)
            print(
                f"\n[{name}] rollout x{cfg.rollout_replicas}, ref x{cfg.ref_replicas}, "
                f"reward x{cfg.reward_replicas}, actor x1 (= {cfg.train_workers} virtual workers); "
                f"{cfg.rows_per_step} rows/step, {cfg.steps} steps",
                flush=True,
            )
            runs = [("sync", 0)] + [("async", s) for s in settings.staleness]
            for mode, staleness in runs:
                t0 = time.perf_counter()
                row = run_sim(client, name, cfg, mode, staleness, root)
                print(
                    f"  {row['mode']:<11} {row['samples_per_s']:8.1f} samples/s "
                    f"({100 * row['efficiency']:.1f}% of bound) in {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
                rows.append(row)
    return rows


def print_sim(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    print("\n== (1) simulated workload on the real runtime ==")
    head = (
        f"{'layout':<9} {'mode':<11} {'samples/s':>10} {'step s':>7} {'bound/s':>8} "
        f"{'eff.':>6} {'model':>6} {'runtime':>8} {'stale':>9} {'calls/s':>8} "
        f"{'CPU d/w0/w1':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cpu = r["cpu"]
        cores = "/".join(
            f"{cpu.get(k, 0):.2f}" for k in ("driver_cores", "worker0_cores", "worker1_cores")
        )
        print(
            f"{r['layout']:<9} {r['mode']:<11} {r['samples_per_s']:10.1f} "
            f"{r['step_time_mean']:7.2f} {r['bound_samples_per_s']:8.1f} "
            f"{100 * r['efficiency']:5.1f}% {100 * r['model_efficiency']:5.1f}% "
            f"{100 * r['runtime_efficiency']:7.1f}% "
            f"{r['staleness_mean']:4.2f}/{r['staleness_max']:<4.0f} {r['calls_per_s']:8.0f} "
            f"{cores:>15}"
        )
    long_run = ", ".join(
        f"{100 * r['model_long_run_efficiency']:.1f}%" for r in rows if r["mode"] != "sync"
    )
    print(
        "\n".join(
            [
                "whole runs: samples / sum of step times (async's first step includes the "
                "pipeline fill).",
                "eff. = measured / bottleneck-stage bound (the bottleneck: "
                f"{rows[0]['bottleneck']}). model = that mode's zero-overhead",
                "schedule / bound (sync: stage barriers, round-robin makespans; async: "
                "staleness bound, fill",
                f"and drain; over {LONG_RUN_STEPS} steps: {long_run}). runtime = measured / "
                "model: what the runtime costs.",
                "stale = staleness mean/max. calls/s = operator calls (micro-batches) per "
                "second. CPU = cores",
                "used by the driver (with the scheduler) / worker 0 / worker 1.",
            ]
        )
    )
    targets = []
    for layout in dict.fromkeys(r["layout"] for r in rows):
        sync = next(r for r in rows if r["layout"] == layout and r["mode"] == "sync")
        for r in rows:
            if r["layout"] != layout or r["mode"] == "sync":
                continue
            ratio = r["samples_per_s"] / sync["samples_per_s"]
            model_ratio = r["model_samples_per_s"] / sync["model_samples_per_s"]
            r["ratio_vs_sync"], r["model_ratio_vs_sync"] = ratio, model_ratio
            print(
                f"{layout} {r['mode']} / sync: {ratio:.2f}x (zero-overhead models: "
                f"{model_ratio:.2f}x)"
            )
            what = f"{layout} {r['mode']}"
            targets += [
                (f"{what} >= {TARGET_RATIO:.1f}x sync", f"{ratio:.2f}x", ratio >= TARGET_RATIO),
                (
                    f"{what} >= {100 * TARGET_EFFICIENCY:.0f}% of bound",
                    f"{100 * r['efficiency']:.1f}%",
                    r["efficiency"] >= TARGET_EFFICIENCY,
                ),
            ]
        print(f"{layout} sync step, mean per step (share of the step) measured | modelled:")
        for stage, b in sync["breakdown"].items():
            print(
                f"    {stage:<12} {b['measured_s']:6.3f}s ({100 * b['share']:4.1f}%) | "
                f"{b['model_s']:6.3f}s ({100 * b['model_share']:4.1f}%)"
            )
    once = all(r["exactly_once"] for r in rows)
    targets.append(("every sample trained exactly once (all runs)", str(once), once))
    print("\nasync per-stage probes (util = operator busy / (run time x replicas)):")
    print(
        f"{'layout':<9} {'mode':<11} {'stage':<8} {'calls':>6} {'rows':>5} {'util':>6} "
        f"{'ovh p50':>8} {'ovh mean':>9} {'ovh %':>6} {'gap p50':>8} {'gap %':>6} "
        f"{'busy/model':>10}"
    )
    for r in rows:
        if r["mode"] == "sync":  # sync sends a stage's calls at once: they queue per replica
            continue
        for stage, st in r["stages"].items():
            print(
                f"{r['layout']:<9} {r['mode']:<11} {stage:<8} {st['calls']:6d} "
                f"{st['rows_per_call']:5.0f} {100 * st['utilisation']:5.1f}% "
                f"{st['call_overhead_ms_p50']:6.1f}ms {st['call_overhead_ms_mean']:7.1f}ms "
                f"{100 * st['call_overhead_share']:5.1f}% {st['gap_ms_p50']:6.1f}ms "
                f"{100 * st['gap_share']:5.1f}% {r['busy_vs_model'][stage]:10.3f}"
            )
    for r in rows:
        if r.get("boundary"):
            b = r["boundary"]
            print(
                f"{r['layout']} {r['mode']} step boundary (median): trainer's last micro-batch "
                f"-> end_step done {b['end_step_ms']:.0f} ms (modelled "
                f"{1e3 * r['train_step_s']:.0f}), -> next step's rows queued +{b['feed_ms']:.0f} ms"
            )
    print(
        "ovh = call sent -> outputs stored and acked, minus the operator's own time (actor RPC "
        "both ways,\nserialisation, output check, thread hops, queue put/ack); gap = that -> "
        "the replica's next call sent\n(wake-up, lease, weight load; or no eligible rows). "
        "% = share of the stage's replica-time. busy/model = the operators'\nmeasured busy "
        "time / the modelled work (how faithfully the sleeps run)."
    )
    return targets


# -- (2) the real GRPO run ------------------------------------------------------------------


def run_grpo(client, mode: str, seed: int, steps: int, run_dir: Path, init: str | None):
    from asyncflow.workflows import grpo

    cfg = grpo.GRPOConfig(steps=steps, seed=seed, init=init)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = grpo.recipe(cfg, run_dir)
    options = {"observers": [DispatchLog(run_dir)], "reporter": quiet_reporter(run_dir, steps)}
    if mode == "sync":
        executor = SyncExecutor(recipe, client, run_dir, **options)
    else:
        executor = AsyncExecutor(recipe, client, run_dir, max_staleness=1, **options)
    t0 = time.perf_counter()
    executor.run()
    wall = time.perf_counter() - t0
    del executor
    gc.collect()
    metrics = read_metrics(run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    samples = np.cumsum([m["samples"] for m in metrics])
    seconds = sum(m["step_time"] for m in metrics)
    tail = [m["reward"] for m in metrics[-max(len(metrics) // 4, 1) :]]
    return {
        "mode": mode,
        "seed": seed,
        "samples": int(samples[-1]),
        "seconds": seconds,
        "wall_s": wall,
        "samples_per_s": float(samples[-1]) / seconds,
        "step_time_mean": seconds / len(metrics),
        "accuracy_before": evaluation["before"].get("accuracy"),
        "accuracy_after": evaluation["after"].get("accuracy"),
        "reward_last_quarter_mean": float(np.mean(tail)),
        "reward_last_quarter_std": float(np.std(tail, ddof=1)) if len(tail) > 1 else 0.0,
        "reward_last_quarter_n": len(tail),
        "staleness_mean": float(np.mean([m.get("staleness/mean", 0.0) for m in metrics])),
        "staleness_max": float(max(m.get("staleness/max", 0.0) for m in metrics)),
        "curve": [
            {"samples": int(n), "reward": m["reward"], "accuracy": m["accuracy"]}
            for n, m in zip(samples, metrics, strict=True)
        ],
        "run_dir": str(run_dir),
    }


def bench_real(settings: Settings, root: Path) -> list[dict[str, Any]]:
    from asyncflow.runtime.cluster import ClusterConfig, connect

    runs = []
    init = None  # the first run's warm start (seed 0): every other run starts from it
    with connect(ClusterConfig(n_workers=2, dashboard_address="127.0.0.1:0")) as client:
        for seed in settings.seeds:
            for mode in ("sync", "async"):
                run_dir = root / f"grpo-{mode}-seed{seed}"
                t0 = time.perf_counter()
                run = run_grpo(client, mode, seed, settings.real_steps, run_dir, init)
                init = init or str(run_dir / "warmstart.safetensors")
                print(
                    f"  grpo {mode:<5} seed {seed}: {run['samples_per_s']:7.1f} samples/s, "
                    f"accuracy {100 * run['accuracy_before']:.1f}% -> "
                    f"{100 * run['accuracy_after']:.1f}% ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
                runs.append(run)
    return runs


def print_real(runs: list[dict[str, Any]], bins: int) -> dict[str, Any]:
    print("\n== (2) real tiny-LM GRPO on this CPU (max staleness 1 for async) ==")
    head = (
        f"{'mode':<6} {'seed':>4} {'samples/s':>10} {'step s':>7} {'acc before':>10} "
        f"{'acc after':>9} {'reward (last 1/4)':>19} {'stale':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        print(
            f"{r['mode']:<6} {r['seed']:>4} {r['samples_per_s']:10.1f} {r['step_time_mean']:7.3f} "
            f"{100 * r['accuracy_before']:9.1f}% {100 * r['accuracy_after']:8.1f}% "
            f"{r['reward_last_quarter_mean']:9.3f} ± {r['reward_last_quarter_std']:.3f}   "
            f"{r['staleness_mean']:4.2f}/{r['staleness_max']:<4.0f}"
        )
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in ("sync", "async")}
    rate = {m: float(np.mean([r["samples_per_s"] for r in rs])) for m, rs in by_mode.items()}
    summary: dict[str, Any] = {"samples_per_s": rate, "ratio": rate["async"] / rate["sync"]}
    print(f"async/sync samples/s: {summary['ratio']:.2f}x")

    # reward against samples seen: mean reward per bin of equal steps, per mode (seeds averaged)
    steps = min(len(r["curve"]) for r in runs)
    edges = np.linspace(0, steps, bins + 1).astype(int)
    print("\nreward vs samples seen (mean over the bin's steps and seeds):")
    print(f"{'samples seen':>14} {'sync':>7} {'async':>7} {'async-sync':>11}")
    curve = []
    for lo, hi in itertools.pairwise(edges):
        point = {"samples": runs[0]["curve"][hi - 1]["samples"]}
        for m, rs in by_mode.items():
            point[m] = float(np.mean([c["reward"] for r in rs for c in r["curve"][lo:hi]]))
        curve.append(point)
        print(
            f"{point['samples']:>14,} {point['sync']:7.3f} {point['async']:7.3f} "
            f"{point['async'] - point['sync']:+11.3f}"
        )
    summary["reward_curve"] = curve

    # noise: the standard error of a last-quarter mean, from the per-step spread; with
    # several seeds also the seed-to-seed spread of that mean
    def last(m: str, key: str) -> list[float]:
        return [r[key] for r in by_mode[m]]

    diff = float(np.mean(last("async", "reward_last_quarter_mean"))) - float(
        np.mean(last("sync", "reward_last_quarter_mean"))
    )
    se = float(
        np.sqrt(
            sum(
                (r["reward_last_quarter_std"] ** 2 / r["reward_last_quarter_n"])
                / len(by_mode[r["mode"]]) ** 2
                for r in runs
            )
        )
    )
    seed_sd = None
    if len(by_mode["sync"]) > 1:
        seed_sd = float(
            np.mean([np.std(last(m, "reward_last_quarter_mean"), ddof=1) for m in by_mode])
        )
    acc = {m: float(np.mean(last(m, "accuracy_after"))) for m in by_mode}
    noise = 2 * max(se, seed_sd or 0.0)
    verdict = "within noise of" if abs(diff) <= noise else "above" if diff > 0 else "BELOW"
    summary.update(
        {
            "reward_last_quarter_diff": diff,
            "reward_last_quarter_se": se,
            "reward_seed_sd": seed_sd,
            "accuracy_after": acc,
            "verdict": f"async {verdict} sync",
            "async_not_worse": diff >= -noise,
        }
    )
    print(
        f"last-quarter reward, async - sync: {diff:+.3f} (noise: 2 x standard error "
        f"{2 * se:.3f}"
        + (f", seed-to-seed sd {seed_sd:.3f}" if seed_sd is not None else "")
        + f") -> async {verdict} sync per sample seen;\nheld-out accuracy after: sync "
        f"{100 * acc['sync']:.1f}%, async {100 * acc['async']:.1f}% (one greedy evaluation "
        "of the final weights per run)"
    )
    return summary


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one layout, short runs (< 3 min)")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument("--only", choices=("sim", "real"), help="run only one of the two parts")
    parser.add_argument("--work-dir", type=Path, help="keep the run directories here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    logging.getLogger("distributed").setLevel(logging.ERROR)
    meta = describe("torch", "dask", "distributed") | {"mode": "quick" if args.quick else "full"}
    meta["settings"] = dataclasses.asdict(settings)
    print(
        f"asyncflow async vs sync ({meta['mode']}) -- {meta['date']}\n"
        f"machine: {meta['cores']} cores, {meta['platform']}, load average "
        f"{meta['load_average_1m_at_start']}; python {meta['python']}, torch {meta['torch']}, "
        f"dask/distributed {meta['dask']}/{meta['distributed']}, asyncflow "
        f"{meta['asyncflow_commit']}",
        flush=True,
    )
    started = time.perf_counter()
    out: dict[str, Any] = {"meta": meta}
    targets: list[tuple[str, str, bool]] = []
    with contextlib.ExitStack() as stack:
        root = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.only in (None, "sim"):
            out["sim"] = bench_sim(settings, root / "sim")
        if args.only in (None, "real"):
            print("\n[grpo] the real tiny-LM run", flush=True)
            out["real"] = bench_real(settings, root / "real")
        if "sim" in out:
            targets += print_sim(out["sim"])
            out["sim_cost_model"] = dataclasses.asdict(sim.CostModel())
        if "real" in out:
            out["real_summary"] = summary = print_real(out["real"], bins=5 if args.quick else 10)
            targets.append(
                (
                    "GRPO: async reward per sample not below sync beyond noise",
                    f"{summary['reward_last_quarter_diff']:+.3f} ({summary['verdict']})",
                    summary["async_not_worse"],
                )
            )
    meta["elapsed_s"] = time.perf_counter() - started
    meta["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    if targets:
        print("\ntargets:")
        for what, value, ok in targets:
            print(f"  {'PASS' if ok else 'MISS'}  {what}: {value}")
    out["targets"] = [list(t) for t in targets]
    print(
        f"\n(total {meta['elapsed_s']:.0f} s; load average {meta['load_average_1m_at_start']} "
        f"at start, {meta['load_average_1m_at_end']} at end, on {meta['cores']} cores)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
