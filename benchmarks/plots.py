"""PNGs of benchmark results, for the README: every figure names the machine, date and
command it came from (read from the result JSONs, not typed in).

    python benchmarks/plots.py --async-vs-sync R.json --timeline SYNC_RUN ASYNC_RUN \\
        --transfer-queue TQ.json --vs-trl TRL.json --out docs/img

Any input may be left out; its figures are then not drawn. SYNC_RUN and ASYNC_RUN are run
directories of the same job in the two modes (their dispatches.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from machine_info import memory_gib  # noqa: E402

from asyncflow.runtime.observe.plot import draw_timeline, run_timeline  # noqa: E402

SYNC, ASYNC, BASE, BOUND = "#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _source(meta: dict[str, Any], command: str) -> str:
    """One caption line: where and when a figure was measured, and how to redo it."""
    cores = meta.get("cores", "?")
    ram = meta.get("memory_gib") or meta.get("ram_gib")
    cpu = meta.get("cpu", "")
    machine = f"{cores} cores{' ' + cpu if cpu else ''}{f', {ram} GiB' if ram else ''}"
    commit = meta.get("asyncflow_commit", "")
    date = str(meta.get("date", ""))[:10]
    return f"{machine} | {date}{' | asyncflow ' + commit if commit else ''} | $ {command}"


def _save(fig, path: Path, caption: str) -> Path:
    fig.text(0.01, 0.005, caption, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=90)
    return path


# -- async vs sync -------------------------------------------------------------------------


def async_vs_sync_throughput(plt, data: dict[str, Any], out: Path) -> Path:
    sims: dict[str, dict[str, Any]] = {}
    for run in data.get("sim", []):
        sims.setdefault(run["layout"], {})[run["mode"].split()[0]] = run
    real = data.get("real", [])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    layouts = [name for name, modes in sims.items() if {"sync", "async"} <= modes.keys()]
    for i, name in enumerate(layouts):
        sync, asyn = sims[name]["sync"], sims[name]["async"]
        bound = asyn["bound_samples_per_s"]
        left.bar(i - 0.2, sync["samples_per_s"], 0.4, color=SYNC, label="sync" if i == 0 else "")
        left.bar(i + 0.2, asyn["samples_per_s"], 0.4, color=ASYNC, label="async" if i == 0 else "")
        left.hlines(bound, i - 0.4, i + 0.4, color=BOUND, lw=2, label="bound" if i == 0 else "")
        ratio = asyn["samples_per_s"] / sync["samples_per_s"]
        left.text(
            i + 0.2,
            asyn["samples_per_s"],
            f"{ratio:.2f}x\n{asyn['efficiency']:.0%}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.set_xticks(range(len(layouts)), layouts)
    left.set_ylabel("samples/s")
    left.set_title("Simulated workload on the real runtime (label: async/sync, % of bound)")
    left.legend(fontsize=8, loc="upper left")
    if real:
        for mode, color in (("sync", SYNC), ("async", ASYNC)):
            runs = [r for r in real if r["mode"] == mode]
            for r in runs:
                xs = [p["samples"] for p in r["curve"]]
                right.plot(
                    xs,
                    [p["reward"] for p in r["curve"]],
                    color=color,
                    alpha=0.8,
                    label=f"{mode} seed {r['seed']}: {r['samples_per_s']:.0f} samples/s",
                )
        right.set_xlabel("samples seen")
        right.set_ylabel("reward (batch mean)")
        right.set_title("Real tiny-LM GRPO: reward per sample seen")
        right.legend(fontsize=7)
        right.grid(alpha=0.3)
    else:
        right.set_axis_off()
    command = "python benchmarks/async_vs_sync.py --json R.json"
    return _save(fig, out / "async_vs_sync.png", _source(data.get("meta", {}), command))


def async_vs_sync_timeline(
    plt, sync_dir: Path, async_dir: Path, meta: dict[str, Any], command: str, out: Path
) -> Path:
    """The same workload's operator timeline, sync above async, over the same seconds."""
    timelines = [run_timeline(sync_dir), run_timeline(async_dir)]
    lanes = max(len({(d["worker"], d["operator"], d["replica"]) for d in t[1]}) for t in timelines)
    fig, axes = plt.subplots(2, 1, figsize=(12, max(5, 0.5 * lanes * 2 + 2)), sharex=True)
    window = (0.0, 3.0)
    for ax, (metrics, dispatches, colors), title in zip(
        axes, timelines, ("sync", "async (max staleness 1)"), strict=True
    ):
        draw_timeline(ax, metrics, dispatches, colors, window=window)
        ax.set_title(
            f"{title}: operator activity per worker, first {window[1]:.0f} s (dotted: step ends)",
            fontsize=10,
        )
    return _save(fig, out / "async_vs_sync_timeline.png", _source(meta, command))


def _run_meta(run_dir: Path) -> dict[str, Any]:
    """Machine and date of a run directory (its files' time; this machine)."""
    import datetime as dt
    import os

    stamp = dt.datetime.fromtimestamp((run_dir / "metrics.jsonl").stat().st_mtime, dt.UTC)
    return {"cores": os.cpu_count(), "memory_gib": memory_gib(), "date": stamp.isoformat()}


# -- TransferQueue vs transferqueue ---------------------------------------------------------


def transfer_queue(plt, data: dict[str, Any], out: Path) -> Path | None:
    if "transferqueue_put_ratio_ours" not in data:
        return None
    ours = {"put": data["put_small_client_gibs_best"], "get": data["get_small_cross_gibs_best"]}
    theirs = {v: data[f"transferqueue_{v}_gibs_best"] for v in ("put", "get")}
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, verb in enumerate(("put", "get")):
        ax.bar(
            i - 0.2, ours[verb], 0.4, color=ASYNC, label="asyncflow TransferQueue" if i == 0 else ""
        )
        ax.bar(
            i + 0.2,
            theirs[verb],
            0.4,
            color=BASE,
            label=f"transferqueue {data.get('transferqueue_version', '')}" if i == 0 else "",
        )
        ax.text(i - 0.2, ours[verb], f"{ours[verb] / theirs[verb]:.1f}x", ha="center", va="bottom")
    ax.set_xticks([0, 1], ["put (client -> storage)", "get (cross-process)"])
    ax.set_ylabel("GiB/s (best of runs)")
    rows, mib = data.get("transferqueue_rows", "?"), data.get("transferqueue_bytes", 0) / 2**20
    ax.set_title(f"{rows} rows x 9 x 8192 fp32 ({mib:.0f} MiB), same machine, one run")
    ax.legend(fontsize=8)
    command = "ASYNCFLOW_TQ_PYTHON=... python benchmarks/transfer_queue.py --json TQ.json"
    return _save(fig, out / "transfer_queue.png", _source(data.get("meta", {}), command))


# -- asyncflow vs TRL -------------------------------------------------------------------------


def vs_trl(plt, data: dict[str, Any], out: Path) -> Path:
    systems = data["systems"]
    colors = {"asyncflow_sync": SYNC, "asyncflow_async": ASYNC}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(systems)
    for i, name in enumerate(names):
        left.bar(i, systems[name]["samples_per_s"], color=colors.get(name, BASE))
        left.text(
            i,
            systems[name]["samples_per_s"],
            f"{systems[name]['samples_per_s']:.0f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
        curve = systems[name]["curve"]
        right.plot(
            [p["samples_seen"] for p in curve],
            [p["reward"] for p in curve],
            color=colors.get(name, BASE),
            ls="-" if name in colors else "--",
            label=name,
        )
    left.set_xticks(range(len(names)), names, fontsize=8)
    left.set_ylabel("samples/s (training steps)")
    setting = data.get("setting", {})
    left.set_title(
        f"Same Qwen2 config (hidden {setting.get('hidden')}, {setting.get('layers')} "
        f"layers), task, optimizer",
        fontsize=10,
    )
    right.set_xlabel("samples seen")
    right.set_ylabel("reward (window mean)")
    right.set_title("Reward per sample seen")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    command = "python benchmarks/vs_trl.py --quick --json TRL.json"
    return _save(fig, out / "vs_trl.png", _source(data.get("meta", {}), command))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--async-vs-sync", type=Path, metavar="JSON")
    parser.add_argument(
        "--timeline",
        nargs=2,
        type=Path,
        metavar=("SYNC_RUN", "ASYNC_RUN"),
        help="two run directories of the same job (asyncflow run ... --mode sync / async)",
    )
    parser.add_argument("--transfer-queue", type=Path, metavar="JSON")
    parser.add_argument("--vs-trl", type=Path, metavar="JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    plt = _pyplot()
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    if args.async_vs_sync:
        data = json.loads(args.async_vs_sync.read_text())
        written.append(async_vs_sync_throughput(plt, data, args.out))
    if args.timeline:
        sync_dir, async_dir = args.timeline
        meta = _run_meta(sync_dir)
        command = "asyncflow run grpo --steps 12 --mode sync|async (the first 3 s)"
        written.append(async_vs_sync_timeline(plt, sync_dir, async_dir, meta, command, args.out))
    if args.transfer_queue:
        written.append(transfer_queue(plt, json.loads(args.transfer_queue.read_text()), args.out))
    if args.vs_trl:
        written.append(vs_trl(plt, json.loads(args.vs_trl.read_text()), args.out))
    for path in written:
        if path is not None:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
