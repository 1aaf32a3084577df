"""What a run prints: a live rich bar, plain lines, JSON lines for scripts, or nothing.

`RunReporter` (runtime/report.py) hands its messages and step records to one of these:

- rich: a live bar with step, ETA, reward, accuracy and samples/s, with each message
  and step line printed above it (a terminal's default);
- plain: one line per message and per step (the default when output is not a terminal);
- json: one JSON object per line: {"event": "info", "message": ...} and
  {"event": "step", ...the step's metrics, "total_steps": N, "eta_s": ...};
- quiet: nothing (metrics still go to the run directory).
"""

from __future__ import annotations

import json
import math
from collections import deque
from typing import IO, Any

MODES = ("rich", "plain", "json", "quiet")


def resolve(mode: str | None, stream: IO[str]) -> str:
    """`auto`/None: rich on a terminal, plain otherwise."""
    if mode in (None, "auto"):
        isatty = getattr(stream, "isatty", None)
        return "rich" if isatty is not None and isatty() else "plain"
    if mode not in MODES:
        raise ValueError(f"progress must be one of {('auto', *MODES)}, got {mode!r}")
    return mode


def make_console(mode: str | None, stream: IO[str], total_steps: int) -> Console:
    mode = resolve(mode, stream)
    if mode == "rich":
        return RichConsole(stream, total_steps)
    if mode == "json":
        return JsonConsole(stream, total_steps)
    if mode == "quiet":
        return Console(stream, total_steps)
    return PlainConsole(stream, total_steps)


def format_step(record: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step'] + 1:>{len(str(total_steps))}}/{total_steps}"]
    if "reward" in record:
        parts.append(f"reward {record['reward']:.3f}")
    if "accuracy" in record:
        parts.append(f"accuracy {100 * record['accuracy']:5.1f}%")
    parts.append(f"{record['samples_per_s']:7.1f} samples/s")
    parts.append(f"step {record['step_time']:.2f}s")
    return " | ".join(parts)


class Console:
    """Quiet: prints nothing. Subclasses print."""

    def __init__(self, stream: IO[str], total_steps: int) -> None:
        self.stream = stream
        self.total_steps = total_steps
        self._times: deque[float] = deque(maxlen=10)

    def eta(self, record: dict[str, Any]) -> float | None:
        """Seconds left: mean of the last 10 step times x steps to go."""
        step_time = record.get("step_time")
        if isinstance(step_time, (int, float)) and math.isfinite(step_time):
            self._times.append(float(step_time))
        if not self._times:
            return None
        return sum(self._times) / len(self._times) * max(0, self.total_steps - record["step"] - 1)

    def info(self, message: str) -> None: ...

    def step(self, record: dict[str, Any]) -> None:
        self.eta(record)

    def close(self) -> None: ...


class PlainConsole(Console):
    def info(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def step(self, record: dict[str, Any]) -> None:
        self.eta(record)
        self.info(format_step(record, self.total_steps))


class JsonConsole(Console):
    def _emit(self, obj: dict[str, Any]) -> None:
        obj = {k: _finite(v) for k, v in obj.items()}  # strict JSON: NaN/inf become null
        print(json.dumps(obj, sort_keys=True, default=_plain), file=self.stream, flush=True)

    def info(self, message: str) -> None:
        self._emit({"event": "info", "message": message})

    def step(self, record: dict[str, Any]) -> None:
        eta = self.eta(record)
        self._emit({"event": "step", **record, "total_steps": self.total_steps, "eta_s": eta})


class RichConsole(Console):
    """A rich live bar; messages and step lines scroll above it."""

    def __init__(self, stream: IO[str], total_steps: int) -> None:
        super().__init__(stream, total_steps)
        from rich.console import Console as RichTerminal
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=16),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("reward {task.fields[reward]}"),
            TextColumn("acc {task.fields[accuracy]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            console=RichTerminal(file=stream),
            refresh_per_second=4,
        )
        self.task = self.progress.add_task(
            "run", total=total_steps, eta="-", reward="-", accuracy="-", rate="-"
        )
        self._live = False  # the bar starts with the first message, not at construction

    def info(self, message: str) -> None:
        if not self._live:
            self.progress.start()
            self._live = True
        self.progress.console.print(message, markup=False, highlight=False)

    def step(self, record: dict[str, Any]) -> None:
        eta = self.eta(record)
        self.info(format_step(record, self.total_steps))
        fields = {
            "eta": "-" if eta is None else _duration(eta),
            "rate": f"{record.get('samples_per_s', 0.0):.1f}",
        }
        if "reward" in record:
            fields["reward"] = f"{record['reward']:.3f}"
        if "accuracy" in record:
            fields["accuracy"] = f"{100 * record['accuracy']:.1f}%"
        self.progress.update(self.task, completed=record["step"] + 1, **fields)

    def close(self) -> None:
        if self._live:
            self.progress.stop()
            self._live = False


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
