"""Seeing a run: live state, the dashboard page, Prometheus metrics, spans, progress, plots.

One module per job:

- `live.py`: `LiveState`, the driver-side observer that aggregates what the run does
  (per-operator counters and rates, queue occupancy, weight versions, staleness of trained
  samples, step curves, the activity timeline) with O(1) thread-safe hooks.
- `publish.py`: `DashboardPublisher`, which pushes the changes of a `LiveState` to the
  scheduler about once a second, batched, from its own thread.
- `board.py`: `Board`, the scheduler-side copy of a run's state and the JSON the page reads.
- `dashboard.py`: the scheduler plugin/extension that keeps the board, serves the page
  (`/asyncflow`) and its JSON, links the page from the dashboard's menu and feeds
  `/metrics`; `dask scheduler --preload asyncflow.runtime.observe.dashboard` installs it.
- `page.py`: the page itself (HTML, CSS and JavaScript, no external resources).
- `prometheus.py`: the `asyncflow_*` metrics, collected from the board on each scrape.
- `spans.py`: per-operator Dask spans, so "Fine Performance Metrics" breaks time down
  by operator (actor calls are metered on the worker into those spans).
- `progress.py`: the terminal: rich, plain, JSON lines or quiet.
- `files.py`: metrics.csv, dispatches.jsonl (the operator timeline) and TensorBoard.
- `plot.py`: `asyncflow plot RUN_DIR` (matplotlib, optional extra `plot`).
- `commands.py`: the command-line glue (`asyncflow run` options, `asyncflow plot`).

Importing this package is cheap: modules import Dask, rich or matplotlib only when used.
"""

from __future__ import annotations

PAGE_PATH = "asyncflow"  # the page lives at <dashboard>/asyncflow
STATE_PATH = "asyncflow/api/state.json"  # the JSON behind it


def page_url(dashboard: str | None) -> str | None:
    """The page's URL from the dashboard's (http://HOST:PORT/status -> .../asyncflow)."""
    if not dashboard:
        return None
    base = dashboard.rsplit("/", 1)[0] if dashboard.rstrip("/").endswith("status") else dashboard
    return base.rstrip("/") + "/" + PAGE_PATH
