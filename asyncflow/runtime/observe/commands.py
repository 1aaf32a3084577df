"""Command-line glue: `asyncflow run` options for watching a run, and `asyncflow plot`.

Kept here so cli.py only registers them: `add_run_options(run_parser)`,
`add_plot_command(subparsers)`, and in `asyncflow run` `attach(args, run_dir, steps,
observers)`, which returns the run's RunReporter and appends the observers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PROGRESS_CHOICES = ("auto", "rich", "plain", "json", "quiet")


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--progress",
        choices=PROGRESS_CHOICES,
        default="auto",
        help="terminal output: rich (a live bar), plain (a line per step), json (one JSON "
        "object per line, for scripts), quiet (nothing); auto: rich on a terminal, else plain",
    )
    run.add_argument(
        "--no-dashboard-page",
        dest="dashboard_page",
        action="store_false",
        help="do not add the live /asyncflow page, asyncflow_* metrics and per-operator "
        "spans to the Dask dashboard",
    )


def add_plot_command(sub: Any) -> None:
    plot = sub.add_parser(
        "plot",
        help="write PNGs of a run: reward/accuracy, throughput, staleness, timeline",
        description="Plot a run directory's metrics and operator timeline (needs matplotlib: "
        "pip install 'asyncflow[plot]').",
    )
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    plot.add_argument("--out", type=Path, help="where the PNGs go (default: RUN_DIR/plots)")
    plot.set_defaults(handler=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from asyncflow.runtime.observe.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def attach(args: argparse.Namespace, run_dir: Path, total_steps: int, observers: list) -> Any:
    """The run's reporter (progress mode), with our observers appended to `observers`."""
    from asyncflow.runtime.observe.files import (
        DispatchLog,
        TensorBoardWriter,
        tensorboard_available,
    )
    from asyncflow.runtime.report import RunReporter

    reporter = RunReporter(run_dir, total_steps, progress=getattr(args, "progress", "auto"))
    observers.append(DispatchLog(run_dir))
    if tensorboard_available():
        observers.append(TensorBoardWriter(run_dir))
    if getattr(args, "dashboard_page", True):
        from asyncflow.runtime.observe.live import LiveState
        from asyncflow.runtime.observe.publish import DashboardPublisher

        live = LiveState()
        observers.extend([live, DashboardPublisher(live, say=reporter.info)])
    return reporter
