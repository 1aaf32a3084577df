"""Board: the scheduler-side copy of a run's live state, and the JSON the page reads.

The driver pushes `start` once (the run's header: workflow, graph, steps...) and then
`update` deltas (`LiveState.take_delta`): gauges replace the previous ones, new steps,
timeline segments and messages are appended to bounded buffers, and one point per
update goes into the time series the page draws. Plain Python, no Dask: the extension
calls it on the scheduler's event loop, so every method is quick and never waits.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from typing import Any

SERIES_IN_VIEW = 900  # points of the rate time series the page gets (~15 min at 1/s)
TIMELINE_SECONDS = 120.0  # timeline segments the page gets: the last two minutes


class Board:
    def __init__(
        self, max_steps: int = 100_000, max_segments: int = 20_000, max_series: int = 7_200
    ) -> None:
        self.max_steps = max_steps
        self.max_segments = max_segments
        self.max_series = max_series
        self.changes = 0  # bumped by every start/update; the JSON cache keys on it
        self._cache: tuple[int, bytes] | None = None
        self.reset(None)

    def reset(self, header: dict[str, Any] | None) -> None:
        self.header = header
        self.latest: dict[str, Any] = {}
        self.steps: deque[dict[str, Any]] = deque(maxlen=self.max_steps)
        self.segments: deque[list] = deque(maxlen=self.max_segments)
        self.series: deque[dict[str, Any]] = deque(maxlen=self.max_series)
        self.messages: deque[str] = deque(maxlen=50)
        self.updates = 0
        self.received = 0.0  # server clock of the last update
        self.changes += 1

    @property
    def run_id(self) -> str | None:
        return None if self.header is None else self.header.get("run_id")

    def start(self, header: dict[str, Any]) -> None:
        """A new run (or the same one again, after the scheduler lost it): start afresh."""
        if header.get("run_id") != self.run_id:
            self.reset(header)
        else:
            self.header = header
            self.changes += 1

    def update(self, run_id: str, delta: dict[str, Any]) -> bool:
        """Merge a delta; False if the board does not know the run (send `start` first)."""
        if run_id != self.run_id:
            return False
        self.steps.extend(delta.get("new_steps", ()))
        self.segments.extend(delta.get("new_segments", ()))
        self.messages.extend(delta.get("new_messages", ()))
        self.latest = {k: v for k, v in delta.items() if not k.startswith("new_")}
        operators = self.latest.get("operators", {})
        self.series.append(
            {
                "t": self.latest.get("time"),
                "samples_per_s": self.latest.get("rates", {}).get("samples_per_s"),
                "tokens_per_s": self.latest.get("rates", {}).get("tokens_per_s"),
                "queue_rows": self.latest.get("queue", {}).get("live_rows"),
                "throughput": {k: v.get("throughput") for k, v in operators.items()},
                "busy": {k: v.get("busy_fraction") for k, v in operators.items()},
            }
        )
        self.updates += 1
        self.received = time.time()
        self.changes += 1
        return True

    def view(self) -> dict[str, Any]:
        """What the page shows: header, gauges, all steps, recent series and timeline."""
        if self.header is None:
            return {"run": None, "status": "waiting", "server_time": time.time()}
        now = self.latest.get("time") or time.time()
        since = now - TIMELINE_SECONDS
        segments = [s for s in self.segments if s[6] >= since]
        series = list(self.series)[-SERIES_IN_VIEW:]
        return {
            "run": self.header,
            **self.latest,
            "status": self.latest.get("status", "starting"),
            "steps": list(self.steps),
            "series": series,
            "segments": segments,
            "messages": list(self.messages),
            "updates": self.updates,
            "server_time": time.time(),
            "received": self.received,
        }

    def view_json(self) -> bytes:
        """`view()` as JSON bytes, built once per change however many viewers poll."""
        cached = self._cache
        if cached is not None and cached[0] == self.changes:
            return cached[1]
        view = self.view()
        try:
            body = json.dumps(view, allow_nan=False, default=_jsonable).encode()
        except ValueError:  # a NaN or inf slipped in: JSON has no such numbers
            body = json.dumps(_finite(view), allow_nan=False, default=_jsonable).encode()
        self._cache = (self.changes, body)
        return body


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, deque)):
        return [_finite(v) for v in value]
    return value
