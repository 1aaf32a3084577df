"""Per-operator time in the dashboard's "Fine Performance Metrics", through Dask spans.

Dask attributes fine performance metrics to *tasks*: a task runs inside a span, and
its worker meters the time under `("execute", span_id, prefix, activity, unit)`. Our
operators do not run as tasks but as calls to actors (`OperatorHost`), which Dask
does not meter at all. So:

- on the driver, `open_spans` opens one span per operator, `("asyncflow", workflow,
  operator)`, with the public `distributed.span` (one tiny task each, which makes the
  scheduler know the span), and hands the span ids to every worker in a worker plugin;
- on the worker, `OperatorHost._process` calls `meter(operator, seconds, cpu_seconds)`
  after each micro-batch; it records thread CPU and non-CPU seconds under the
  operator's span, with the operator's name as the "function" (task prefix), via the
  worker's own `digest_metric` on the worker's event loop (the metric dicts are not
  thread-safe). The next heartbeat carries them to the scheduler.

In the dashboard: "Fine Performance Metrics" shows a bar per operator name in "task
execution by prefix"; "filter by span tag" picks an operator or `asyncflow`. A worker
without the plugin meters nothing; metering an unknown span id would break the
scheduler's heartbeat handling, which is why ids only come from spans that exist.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

logger = logging.getLogger(__name__)

PLUGIN = "asyncflow-spans"


class _Meter:
    __slots__ = ("loop", "spans", "worker")

    def __init__(self, worker: Any, spans: dict[str, str]) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.spans = spans


_meter: _Meter | None = None  # set on workers by SpanPlugin
_meter_lock = threading.Lock()


def meter(operator: str, seconds: float, cpu_seconds: float) -> None:
    """Called on the replica's thread after a micro-batch; O(1), never blocks."""
    state = _meter
    if state is None:
        return
    span_id = state.spans.get(operator)
    if span_id is None:
        return
    cpu = max(0.0, min(cpu_seconds, seconds))
    state.loop.add_callback(_digest, state.worker, span_id, operator, cpu, seconds - cpu)


def _digest(worker: Any, span_id: str, operator: str, cpu: float, other: float) -> None:
    worker.digest_metric(("execute", span_id, operator, "thread-cpu", "seconds"), cpu)
    worker.digest_metric(("execute", span_id, operator, "thread-noncpu", "seconds"), other)


class SpanPlugin(WorkerPlugin):
    """Gives each worker (current and future) the operator -> span id map of the run."""

    name = PLUGIN

    def __init__(self, spans: dict[str, str]) -> None:
        self.spans = dict(spans)

    def setup(self, worker: Any) -> None:
        global _meter
        with _meter_lock:
            _meter = _Meter(worker, self.spans)

    def teardown(self, worker: Any) -> None:
        global _meter
        with _meter_lock:
            if _meter is not None and _meter.spans is self.spans:
                _meter = None


def span_opened(operator: str) -> str:
    """The tiny task that makes the scheduler create an operator's span."""
    return operator


def open_spans(client: Any, workflow: str, operators: list[str]) -> dict[str, str]:
    """Open a span per operator on the scheduler and give the ids to every worker."""
    from distributed import span

    ids: dict[str, str] = {}
    futures = []
    with span("asyncflow", workflow):
        for name in operators:
            with span(name) as span_id:
                # Dask puts all tasks of one task group in the span of the first of them:
                # a task group of its own per span (tuple key: group = first item, unique;
                # prefix shown in the dashboard = "asyncflow-span").
                key = (f"asyncflow-span-{uuid.uuid4().hex}", 0)
                futures.append(client.submit(span_opened, name, key=key, pure=False))
            ids[name] = span_id
    client.gather(futures)
    known = set(client.run_on_scheduler(_known_spans, list(ids.values())))
    # Only ids the scheduler knows: a worker reporting an unknown span id would have its
    # heartbeat rejected by the scheduler (and be closed).
    ids = {name: span_id for name, span_id in ids.items() if span_id in known}
    if ids:
        client.register_plugin(SpanPlugin(ids))
    missing = sorted(set(operators) - set(ids))
    if missing:
        logger.warning("asyncflow: no Dask span for operators %s; not metered", missing)
    return ids


def _known_spans(span_ids: list[str], dask_scheduler: Any = None) -> list[str]:
    ext = dask_scheduler.extensions.get("spans") if dask_scheduler is not None else None
    return [] if ext is None else [i for i in span_ids if i in ext.spans]


def close_spans(client: Any) -> None:
    """Stop metering (the spans stay on the scheduler with what they collected)."""
    try:
        client.unregister_worker_plugin(PLUGIN)
    except Exception:  # already gone, or the cluster is shutting down
        logger.debug("asyncflow: could not unregister %s", PLUGIN, exc_info=True)
