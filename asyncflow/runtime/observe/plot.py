"""`asyncflow plot RUN_DIR`: PNGs of a finished (or running) run, from its files alone.

- reward_accuracy.png: reward and accuracy per step (metrics.jsonl), with the held-out
  accuracy before and after (evaluation.json) when there is one;
- throughput.png: samples/s and step time per step; rows/s per operator over time;
- staleness.png: how many policy versions behind the trainer its samples were;
- timeline.png: each replica's micro-batches per worker over the run (dispatches.jsonl),
  with step ends marked, so idle gaps (bubbles) show.

Needs matplotlib (`pip install 'asyncflow[plot]'`); the figures are drawn off-screen.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from asyncflow.errors import ConfigError
from asyncflow.runtime.observe.files import read_dispatches

PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "asyncflow plot needs matplotlib: pip install 'asyncflow[plot]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs for `run_dir` into `out_dir` (default: RUN_DIR/plots); their paths."""

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    plt = _pyplot()
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, dispatches, colors = run_timeline(run_dir)
    evaluation_path = run_dir / "evaluation.json"
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else {}

    written = [
        _reward_accuracy(plt, metrics, evaluation, out_dir / "reward_accuracy.png"),
        _throughput(plt, metrics, dispatches, colors, out_dir / "throughput.png"),
        _staleness(plt, metrics, dispatches, out_dir / "staleness.png"),
        _timeline(plt, metrics, dispatches, colors, out_dir / "timeline.png"),
    ]
    return written


def _steps(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(m["step"] + 1, m[key]) for m in metrics if m.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _save(plt, fig, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def _reward_accuracy(plt, metrics, evaluation, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, color in (("reward", "#1971c2"), ("accuracy", "#2b8a3e")):
        x, y = _steps(metrics, key)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 40 else None, ms=3, color=color, label=key)
    before = evaluation.get("before", {}).get("accuracy")
    after = evaluation.get("after", {}).get("accuracy")
    if before is not None:
        ax.axhline(before, color="0.6", ls=":", label=f"held-out before {100 * before:.1f}%")
    if after is not None:
        ax.axhline(after, color="#2b8a3e", ls="--", label=f"held-out after {100 * after:.1f}%")
    if not metrics:
        _empty(ax, "no steps yet")
    ax.set_xlabel("step")
    ax.set_title("Reward and accuracy per step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return _save(plt, fig, path)


def _throughput(plt, metrics, dispatches, colors, path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    x, y = _steps(metrics, "samples_per_s")
    if x:
        top.plot(x, y, color="#1971c2", marker="o" if len(x) < 40 else None, ms=3)
        top.set_ylabel("samples/s", color="#1971c2")
        twin = top.twinx()
        xs, ys = _steps(metrics, "step_time")
        twin.plot(xs, ys, color="#e8590c", ls="--")
        twin.set_ylabel("step time (s)", color="#e8590c")
    else:
        _empty(top, "no steps yet")
    top.set_xlabel("step")
    top.set_title("Throughput and step time per step")
    top.grid(alpha=0.3)
    if dispatches:
        t0 = min(d["started"] for d in dispatches)
        end = max(d["finished"] for d in dispatches) - t0
        width = max(end / 40, 1e-3)  # about 40 bins over the run
        bins: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for d in dispatches:
            bins[d["operator"]][int((d["finished"] - t0) // width)] += d["rows"]
        n = int(end // width) + 1
        for name, counts in bins.items():
            xs = [(i + 0.5) * width for i in range(n)]
            bottom.plot(
                xs,
                [counts.get(i, 0) / width for i in range(n)],
                label=name,
                color=colors.get(name),
                marker="." if n < 50 else None,
            )
        bottom.legend(fontsize=8, ncol=3)
    else:
        _empty(bottom, "no dispatches.jsonl (run with the asyncflow command to record it)")
    bottom.set_xlabel("seconds since the first micro-batch")
    bottom.set_ylabel("rows/s")
    bottom.set_title("Rows per second by operator")
    bottom.grid(alpha=0.3)
    return _save(plt, fig, path)


def _staleness(plt, metrics, dispatches, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    total: list[int] = []
    for d in dispatches:
        for lag, count in enumerate(d.get("staleness") or []):
            if lag >= len(total):
                total.extend([0] * (lag + 1 - len(total)))
            total[lag] += count
    if any(total):
        last = max(i for i, c in enumerate(total) if c)
        left.bar(range(last + 1), total[: last + 1], color="#4dabf7")
        left.set_xticks(range(max(last + 1, 3)))
        left.set_xlim(-0.6, max(last, 2) + 0.6)
    else:
        _empty(left, "no staleness recorded")
    left.set_xlabel("policy versions behind the trainer")
    left.set_ylabel("trained samples")
    left.set_title("Staleness of trained samples")
    for key, style in (("staleness/mean", "-"), ("staleness/max", "--")):
        x, y = _steps(metrics, key)
        if x:
            right.plot(x, y, ls=style, label=key.split("/")[1])
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    else:
        _empty(right, "no staleness in metrics")
    right.set_xlabel("step")
    right.set_title("Staleness per step")
    right.grid(alpha=0.3)
    return _save(plt, fig, path)


def run_timeline(run_dir: Path) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(metrics, dispatches, operator colours) of a run directory, for `draw_timeline`."""
    from asyncflow.runtime.report import read_metrics

    events = read_dispatches(Path(run_dir))
    runs = [e for e in events if e.get("event") == "run"]
    order = list(runs[-1]["order"]) if runs else []
    dispatches = [e for e in events if e.get("event") == "dispatch"]
    for d in dispatches:
        if d["operator"] not in order:
            order.append(d["operator"])
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(order)}
    return read_metrics(Path(run_dir)), dispatches, colors


def draw_timeline(
    ax, metrics, dispatches, colors, window: tuple[float, float] | None = None
) -> None:
    """Each replica's micro-batches as bars on its worker's lane (dark: the operator was
    busy; light: in flight), step ends dotted. `window` (seconds since the first
    micro-batch) zooms in so the bubbles of a long run stay visible."""
    lanes = sorted(
        {(d["worker"], d["operator"], d["replica"]) for d in dispatches},
        key=lambda lane: (
            lane[0],
            list(colors).index(lane[1]) if lane[1] in colors else 0,
            lane[2],
        ),
    )
    if not dispatches:
        _empty(ax, "no dispatches.jsonl (run with the asyncflow command to record it)")
        return
    t0 = min(d["started"] for d in dispatches)
    index = {lane: i for i, lane in enumerate(lanes)}
    per_lane: dict[tuple, list] = defaultdict(list)
    for d in dispatches:
        per_lane[(d["worker"], d["operator"], d["replica"])].append(d)
    for lane, ds in per_lane.items():
        y = index[lane]
        color = colors.get(lane[1])
        sent = [(d["started"] - t0, d["finished"] - d["started"]) for d in ds]
        busy = [(d["finished"] - t0 - d["busy"], d["busy"]) for d in ds]
        ax.broken_barh(sent, (y - 0.35, 0.7), facecolors=color, alpha=0.3)
        ax.broken_barh(busy, (y - 0.35, 0.7), facecolors=color)
    for t in _step_ends(metrics, dispatches):
        ax.axvline(t - t0, color="0.6", ls=":", lw=0.8)
    if window is not None:
        ax.set_xlim(*window)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{w.split('://')[-1]}  {op}#{r}" for w, op, r in lanes], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first micro-batch (dark: operator busy; light: in flight)")
    ax.grid(axis="x", alpha=0.3)


def _timeline(plt, metrics, dispatches, colors, path: Path) -> Path:
    lanes = {(d["worker"], d["operator"], d["replica"]) for d in dispatches}
    fig, ax = plt.subplots(figsize=(12, max(2.5, 0.45 * len(lanes) + 1.5)))
    draw_timeline(ax, metrics, dispatches, colors)
    ax.set_title("Operator activity per worker (dotted: step ends)")
    return _save(plt, fig, path)


def _step_ends(metrics, dispatches) -> list[float]:
    """Wall-clock end of each step: its last dispatch (metrics carry no wall clock)."""
    last: dict[int, float] = {}
    for d in dispatches:
        last[d["step"]] = max(last.get(d["step"], 0.0), d["finished"])
    return sorted(last.values())
