"""A run's numbers in its directory, beyond metrics.jsonl.

- `CsvMetrics`: metrics.csv, the same records as metrics.jsonl, one row per step (the
  header is the union of keys; a record with a new key rewrites the file from the JSONL).
- `DispatchLog`: dispatches.jsonl, one line per finished micro-batch (operator, replica,
  worker, step, rows, wall-clock start and end, busy seconds, weight version and, for
  the trainer, the staleness of its samples): the operator timeline `asyncflow plot` draws.
- `TensorBoardWriter`: scalars per step under tensorboard/, only when the `tensorboard`
  package is installed (it is not a dependency).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncflow.runtime.events import Dispatch, RunInfo, RunObserver
from asyncflow.runtime.observe.live import StalenessTracker, histogram

CSV_NAME = "metrics.csv"
DISPATCHES_NAME = "dispatches.jsonl"
TENSORBOARD_DIR = "tensorboard"


class CsvMetrics:
    """metrics.csv beside metrics.jsonl; `history()` returns every record so far."""

    def __init__(self, path: Path, history: Callable[[], list[dict[str, Any]]]) -> None:
        self.path = Path(path)
        self.history = history
        self.columns: list[str] | None = None
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), None)

    def append(self, record: dict[str, Any]) -> None:
        if self.columns is None or not set(record) <= set(self.columns):
            self.rewrite(self.history())
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([_cell(record.get(c)) for c in self.columns])

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        keys = set().union(*records) if records else set()
        self.columns = ["step", *sorted(keys - {"step"})]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            for record in records:
                writer.writerow([_cell(record.get(c)) for c in self.columns])
        tmp.replace(self.path)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf: spreadsheets and pandas read these
    return value


class DispatchLog(RunObserver):
    """dispatches.jsonl: the run's operator timeline (buffered; flushed every step)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / DISPATCHES_NAME
        self._lock = threading.Lock()
        self._file = None
        self._staleness = StalenessTracker()

    def run_started(self, info: RunInfo) -> None:
        with self._lock:
            self._staleness.configure(info)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._write(
                {
                    "event": "run",
                    "workflow": info.workflow_name or info.graph.name,
                    "mode": info.mode,
                    "order": list(info.graph.order()),
                    "trainer": info.recipe.trainer,
                    "first_step": info.first_step,
                    "max_staleness": info.max_staleness,
                }
            )

    def weights_published(self, operator: str, version: int, weights: dict[str, Any]) -> None:
        with self._lock:
            self._staleness.published_version(operator, version)

    def dispatched(self, d: Dispatch) -> None:
        line: dict[str, Any] = {
            "event": "dispatch",
            "operator": d.operator,
            "replica": d.replica,
            "worker": d.worker,
            "step": d.step,
            "rows": d.inputs.num_rows,
            "started": d.started,
            "finished": d.finished,
            "busy": round(d.busy_seconds, 6),
            "version": d.weight_version,
            "attempt": d.attempt,
        }
        with self._lock:
            lags = self._staleness.lags(d)
            if lags is not None and len(lags):
                line["staleness"] = histogram(lags).tolist()
            self._write(line)

    def step_finished(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._staleness.forget(int(record["step"]))
            if self._file is not None:
                self._file.flush()

    def run_finished(self, summary: dict[str, Any]) -> None:
        with self._lock:
            if self._file is not None:
                self._write({"event": "end", "status": summary.get("status")})
                self._file.close()
                self._file = None

    def _write(self, obj: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(obj) + "\n")


def read_dispatches(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / DISPATCHES_NAME
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardWriter(RunObserver):
    """Each step's numeric metrics as TensorBoard scalars (needs the `tensorboard` package)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        self._lock = threading.Lock()

    def step_finished(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        with self._lock:
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self.writer.add_scalar(key, value, step)

    def run_finished(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self.writer.close()
