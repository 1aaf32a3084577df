"""Watching real runs on real LocalClusters: the page, its JSON and /metrics over HTTP,
per-operator spans in Fine Performance Metrics, a preloaded scheduler, the CLI's modes."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace

import dask_processes
import pytest

from asyncflow.cli import main
from asyncflow.runtime.events import RunObserver
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.observe.live import LiveState
from asyncflow.runtime.observe.publish import DashboardPublisher
from asyncflow.runtime.report import read_metrics
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import grpo

pytestmark = pytest.mark.cluster

SMALL = grpo.GRPOConfig(steps=3, prompts_per_step=8, group_size=4, warmstart_steps=20)
ROWS = 8 * 4


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


class AtStep(RunObserver):
    """When step `step` finished, push the live state and fetch the page, its JSON and
    /metrics, while the run waits (hooks run on the executor's thread). Observers that
    raise are switched off, so this only records; the test asserts afterwards."""

    def __init__(self, publisher: DashboardPublisher, step: int = 0):
        self.publisher, self.step, self.seen = publisher, step, {}

    def step_finished(self, record):
        if record["step"] != self.step:
            return
        self.seen["pushed"] = self.publisher.push()
        url = self.publisher.url
        self.seen["state"] = json.loads(get(url + "/api/state.json"))
        self.seen["page"] = get(url)
        self.seen["metrics"] = get(url.rsplit("/", 1)[0] + "/metrics")


def metric(text: str, line_start: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


def test_page_json_and_metrics_follow_a_real_run(dask_client, tmp_path):
    live = LiveState()
    publisher = DashboardPublisher(live, interval=0.5)
    probe = AtStep(publisher, step=0)
    SyncExecutor(
        grpo.recipe(SMALL, tmp_path), dask_client, tmp_path, observers=[live, publisher, probe]
    ).run()
    records = read_metrics(tmp_path)

    # during the run, after its first step
    assert probe.seen["pushed"]
    state = probe.seen["state"]
    assert state["status"] == "running" and state["steps_done"] == 1
    assert state["run"]["workflow"] == "grpo" and state["run"]["steps"] == 3
    assert state["totals"]["trained"] == ROWS
    for name in ("rollout", "reward", "advantage", "actor"):
        assert state["operators"][name]["consumed"] == ROWS
    assert state["operators"]["prompts"]["produced"] == ROWS
    assert state["steps"][0]["samples"] == records[0]["samples"] == ROWS
    assert state["steps"][0]["step_time"] == pytest.approx(records[0]["step_time"])
    assert state["weights"]["published"]["actor"] == records[0]["weight_version"]
    assert [s[0] for s in state["segments"]].count("rollout") >= 1  # the timeline
    assert '"workflow": "grpo"' in probe.seen["page"] and "Asyncflow" in probe.seen["page"]
    text = probe.seen["metrics"]
    assert metric(text, "asyncflow_trained_samples_total") == ROWS
    assert metric(text, 'asyncflow_samples_consumed_total{operator="reward"}') == ROWS
    assert metric(text, "asyncflow_steps_done") == 1
    assert metric(text, "asyncflow_running") == 1
    assert metric(text, "asyncflow_step_time_seconds") == pytest.approx(records[0]["step_time"])

    # after the run: the final push carries everything
    base = publisher.url
    final = json.loads(get(base + "/api/state.json"))
    assert final["status"] == "finished" and final["steps_done"] == 3
    assert final["totals"]["trained"] == 3 * ROWS
    assert [s["samples"] for s in final["steps"]] == [r["samples"] for r in records]
    assert final["staleness"]["samples"] == 3 * ROWS and final["staleness"]["max"] == 0
    text = get(base.rsplit("/", 1)[0] + "/metrics")
    assert metric(text, "asyncflow_trained_samples_total") == 3 * ROWS
    assert metric(text, "asyncflow_running") == 0
    assert (
        metric(text, 'asyncflow_weight_version{operator="actor"}') == records[-1]["weight_version"]
    )
    # the dashboard's own pages link to ours
    assert 'href="asyncflow"' in get(base.rsplit("/", 1)[0] + "/status")

    # Fine Performance Metrics: time per operator, under its span
    async def heartbeat(dask_worker):
        await dask_worker.heartbeat()

    dask_client.run(heartbeat)  # metrics reach the scheduler with the next heartbeat

    def per_operator(dask_scheduler):
        spans = dask_scheduler.extensions["spans"]
        out = {}
        for name in ("rollout", "reward", "advantage", "actor"):
            metrics = spans.merge_by_tags(name).cumulative_worker_metrics
            out[name] = sum(
                v
                for (context, prefix, *_), v in metrics.items()
                if context == "execute" and prefix == name
            )
        return out

    seconds = dask_client.run_on_scheduler(per_operator)
    assert all(v > 0 for v in seconds.values()), seconds

    def metering(dask_worker):
        from asyncflow.runtime.observe import spans

        return spans._meter is not None

    assert not any(dask_client.run(metering).values())  # switched off after the run


def test_async_run_reports_staleness_within_the_bound(dask_client, tmp_path):
    live = LiveState()
    cfg = replace(SMALL, steps=4)
    AsyncExecutor(
        grpo.recipe(cfg, tmp_path),
        dask_client,
        tmp_path,
        max_staleness=1,
        observers=[live, DashboardPublisher(live, spans=False)],
    ).run()
    records = read_metrics(tmp_path)
    snap = live.snapshot()
    hist = snap["staleness"]["hist"]
    assert sum(hist) == snap["totals"]["trained"] == 4 * ROWS
    assert snap["staleness"]["max"] <= 1
    assert snap["staleness"]["max"] == max(r["staleness/max"] for r in records)
    mean = sum(r["staleness/mean"] for r in records) / len(records)  # equal rows per step
    assert snap["staleness"]["mean"] == pytest.approx(mean)


DASK = dask_processes.DASK


@pytest.mark.skipif(DASK is None, reason="the `dask` command is not on PATH")
def test_preloaded_scheduler_serves_the_page_before_any_run(tmp_path):
    with dask_processes.scheduler(
        tmp_path, "asyncflow.runtime.observe.dashboard", dashboard=True
    ) as info:
        base = f"http://127.0.0.1:{info['services']['dashboard']}"
        assert "Waiting for an asyncflow run" in get(base + "/asyncflow")
        assert json.loads(get(base + "/asyncflow/api/state.json"))["run"] is None
        assert 'href="asyncflow"' in get(base + "/status")


def test_cli_run_json_progress_files_and_plot(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [
        "run",
        "grpo",
        "--steps",
        "2",
        "--run-dir",
        str(run_dir),
        "--progress",
        "json",
        "--set",
        "prompts_per_step=4",
        "--set",
        "group_size=2",
        "--set",
        "warmstart_steps=5",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(events) == len(lines)  # nothing but JSON lines, the first included
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [0, 1] and steps[0]["total_steps"] == 2
    messages = [e["message"] for e in events if e["event"] == "info"]
    assert any(m.startswith("asyncflow page: http://127.0.0.1:") for m in messages)
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3
    dispatches = (run_dir / "dispatches.jsonl").read_text().splitlines()
    assert json.loads(dispatches[0])["event"] == "run"
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run_dir)]) == 0
    assert len(list((run_dir / "plots").glob("*.png"))) == 4
