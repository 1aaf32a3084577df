"""`asyncflow_*` metrics on the dashboard's `/metrics`, collected from the board per scrape.

Dask's `/metrics` serves the scheduler process's default prometheus_client registry.
One collector is registered there per process (several schedulers in one process, as
in tests, would otherwise register duplicate names); it reads the board of the most
recently started asyncflow extension. Counters are the run's own totals, so they
start from zero with each run (Prometheus treats that as a counter reset).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

_lock = threading.Lock()
_source: Callable[[], Any] | None = None  # -> Board | None
_registered = False


def serve_from(source: Callable[[], Any]) -> bool:
    """Make `/metrics` report the board `source()` returns; False without prometheus_client."""
    global _source, _registered
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return False
    with _lock:
        _source = source
        if not _registered:
            REGISTRY.register(AsyncflowCollector())
            _registered = True
    return True


class AsyncflowCollector:
    """A prometheus_client custom collector (duck-typed: `collect()`)."""

    def collect(self) -> Iterator[Any]:
        source = _source
        board = source() if source is not None else None
        if board is None or board.header is None:
            return iter(())
        return iter(families(board.header, board.latest))

    def describe(self) -> list:
        return []  # names depend on the run; nothing to check at registration


def families(header: dict[str, Any], latest: dict[str, Any]) -> list[Any]:
    """The metric families for one run's header and latest gauges."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    out: list[Any] = []

    def gauge(name: str, doc: str, value: Any) -> None:
        if value is not None:
            out.append(GaugeMetricFamily(f"asyncflow_{name}", doc, value=float(value)))

    def counter(name: str, doc: str, value: Any) -> None:
        if value is not None:
            out.append(CounterMetricFamily(f"asyncflow_{name}", doc, value=float(value)))

    def per(kind: type, name: str, doc: str, label: str, values: dict[str, Any]) -> None:
        family = kind(f"asyncflow_{name}", doc, labels=[label])
        for key, value in values.items():
            if value is not None:
                family.add_metric([str(key)], float(value))
        out.append(family)

    info = GaugeMetricFamily(
        "asyncflow_run_info",
        "The run being watched (value 1)",
        labels=["workflow", "mode", "run_id"],
    )
    info.add_metric(
        [str(header.get("workflow")), str(header.get("mode")), str(header.get("run_id"))], 1.0
    )
    out.append(info)
    status = latest.get("status", "starting")
    gauge("running", "1 while the run is running, 0 once it ended", status == "running")
    gauge("steps_planned", "Steps the run will take in total", header.get("steps"))
    gauge("steps_done", "Steps finished by this run", latest.get("steps_done"))

    ops = latest.get("operators", {})

    def field(key: str) -> dict[str, Any]:
        return {name: op.get(key) for name, op in ops.items()}

    per(
        CounterMetricFamily,
        "samples_produced",
        "Rows an operator wrote",
        "operator",
        field("produced"),
    )
    per(
        CounterMetricFamily,
        "samples_consumed",
        "Rows an operator was given",
        "operator",
        field("consumed"),
    )
    per(
        CounterMetricFamily,
        "dispatches",
        "Micro-batches an operator finished",
        "operator",
        field("dispatches"),
    )
    per(
        CounterMetricFamily,
        "operator_busy_seconds",
        "Seconds operators spent on micro-batches",
        "operator",
        field("busy_seconds"),
    )
    per(
        GaugeMetricFamily,
        "operator_busy_fraction",
        "Busy share of replicas over the last window",
        "operator",
        field("busy_fraction"),
    )
    per(
        GaugeMetricFamily,
        "operator_samples_per_second",
        "Rows per second over the last window",
        "operator",
        field("throughput"),
    )
    per(
        GaugeMetricFamily,
        "operator_replicas",
        "Replicas of each operator",
        "operator",
        field("replicas"),
    )
    per(
        GaugeMetricFamily,
        "leases_in_flight",
        "Micro-batches leased and not yet acked",
        "operator",
        field("in_flight"),
    )

    queue = latest.get("queue", {})
    gauge("queue_rows", "Rows live in the TransferQueue", queue.get("live_rows"))
    gauge("queue_capacity_rows", "TransferQueue capacity (rows)", queue.get("capacity_rows"))
    gauge("queue_bytes", "Bytes held by the TransferQueue", queue.get("bytes"))
    gauge("queue_partitions", "Steps with rows in the TransferQueue", queue.get("partitions"))
    per(
        GaugeMetricFamily,
        "queue_ready_rows",
        "Rows whose column is ready, by column",
        "column",
        queue.get("ready", {}),
    )

    totals = latest.get("totals", {})
    counter("trained_samples", "Samples the trainer took", totals.get("trained"))
    counter("tokens_generated", "Response tokens generated", totals.get("tokens"))
    counter("recoveries", "Failures the run recovered from", totals.get("recoveries"))
    counter(
        "leases_redelivered",
        "Leases handed out again after a failure",
        totals.get("redelivered_leases"),
    )
    counter(
        "samples_redelivered", "Rows handed out again after a failure", totals.get("redelivered")
    )

    weights = latest.get("weights", {})
    per(
        GaugeMetricFamily,
        "weight_version",
        "Newest weight version a trainer published",
        "operator",
        weights.get("published", {}),
    )
    loaded = GaugeMetricFamily(
        "asyncflow_loaded_weight_version",
        "Weight version each replica runs with",
        labels=["operator", "replica"],
    )
    for name, replicas in weights.get("loaded", {}).items():
        for replica, version in replicas.items():
            loaded.add_metric([name, str(replica)], float(version))
    out.append(loaded)

    staleness = latest.get("staleness", {})
    hist = staleness.get("hist") or []
    if hist:
        cumulative, buckets = 0, []
        for lag, count in enumerate(hist[:-1]):
            cumulative += count
            buckets.append((str(float(lag)), cumulative))
        buckets.append(("+Inf", cumulative + hist[-1]))
        total = sum(lag * count for lag, count in enumerate(hist))
        out.append(
            HistogramMetricFamily(
                "asyncflow_staleness",
                "Policy versions between generating and training a sample",
                buckets=buckets,
                sum_value=float(total),
            )
        )

    step = latest.get("last_step", {})
    rates = latest.get("rates", {})
    gauge("step", "Index of the last finished step", step.get("step"))
    gauge("step_time_seconds", "Wall time of the last finished step", step.get("step_time"))
    gauge(
        "step_samples_per_second", "Samples per second of the last step", step.get("samples_per_s")
    )
    gauge("reward", "Mean reward of the last step", step.get("reward"))
    gauge("accuracy", "Accuracy of the last step", step.get("accuracy"))
    gauge("staleness_mean", "Mean staleness of the last step's samples", step.get("staleness/mean"))
    gauge(
        "samples_per_second", "Samples trained per second (last window)", rates.get("samples_per_s")
    )
    gauge(
        "tokens_per_second", "Tokens generated per second (last window)", rates.get("tokens_per_s")
    )
    return out
