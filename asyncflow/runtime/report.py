"""Where a run's numbers go: metrics.jsonl and metrics.csv in the run directory, and the
terminal (a live rich bar, plain lines, JSON lines or nothing: `progress`).

The JSONL file is written and flushed every step, so a run that crashes keeps
every step it finished; metrics.csv holds the same records, one row per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

from asyncflow.runtime.observe.files import CSV_NAME, CsvMetrics
from asyncflow.runtime.observe.progress import format_step, make_console

__all__ = ["RunReporter", "format_step", "read_metrics"]


class RunReporter:
    """progress: "auto" (rich on a terminal, else plain), "rich", "plain", "json", "quiet"."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        stream: IO[str] | None = None,
        progress: str = "plain",
    ):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._csv = CsvMetrics(run_dir / CSV_NAME, lambda: read_metrics(self.run_dir))
        self.console = make_console(progress, self.stream, total_steps)

    def truncate_after(self, step: int) -> None:
        """Resuming from a checkpoint: forget steps recorded after it (they will rerun)."""
        self._metrics.close()
        path = self.run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.run_dir) if r["step"] <= step] if path.exists() else []
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._metrics = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._csv.rewrite(kept)

    def info(self, message: str) -> None:
        self.console.info(message)

    def step(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()
        self._csv.append(record)
        self.console.step(record)

    def close(self) -> None:
        self.console.close()
        self._metrics.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
