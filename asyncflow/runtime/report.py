"""Where a run's numbers go: one JSON line per step in the run directory, one line on screen.

The JSONL file is written and flushed every step, so a run that crashes keeps
every step it finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any


class RunReporter:
    def __init__(self, run_dir: Path, total_steps: int, stream: IO[str] | None = None):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def truncate_after(self, step: int) -> None:
        """Resuming from a checkpoint: forget steps recorded after it (they will rerun)."""
        self._metrics.close()
        path = self.run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.run_dir) if r["step"] <= step] if path.exists() else []
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._metrics = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def info(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def step(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()
        self.info(format_step(record, self.total_steps))

    def close(self) -> None:
        self._metrics.close()


def format_step(record: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step'] + 1:>{len(str(total_steps))}}/{total_steps}"]
    if "reward" in record:
        parts.append(f"reward {record['reward']:.3f}")
    if "accuracy" in record:
        parts.append(f"accuracy {100 * record['accuracy']:5.1f}%")
    parts.append(f"{record['samples_per_s']:7.1f} samples/s")
    parts.append(f"step {record['step_time']:.2f}s")
    return " | ".join(parts)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
