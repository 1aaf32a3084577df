"""Watching a run, without a cluster: live state, board, metrics, progress modes, files, plots."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from asyncflow.cli import main
from asyncflow.runtime.events import Dispatch, RunInfo
from asyncflow.runtime.observe import page_url
from asyncflow.runtime.observe.board import Board
from asyncflow.runtime.observe.files import DispatchLog, read_dispatches
from asyncflow.runtime.observe.live import LiveState, token_count
from asyncflow.runtime.observe.page import render_page
from asyncflow.runtime.observe.progress import make_console
from asyncflow.runtime.queue import TransferQueue
from asyncflow.runtime.report import RunReporter, format_step, read_metrics
from asyncflow.workflows import grpo

SMALL = grpo.GRPOConfig(steps=2, prompts_per_step=2, group_size=2, warmstart_steps=1)


def _info(tmp_path: Path, mode: str = "async") -> RunInfo:
    recipe = grpo.recipe(SMALL, tmp_path)
    return RunInfo(
        run_dir=tmp_path,
        mode=mode,
        graph=recipe.workflow.build(),
        recipe=recipe,
        queue=TransferQueue(),
        dashboard="http://127.0.0.1:8787/status",
        scheduler="tcp://127.0.0.1:8786",
        max_staleness=1,
        workflow_name="grpo",
    )


def _dispatch(operator, step, ids, outputs, version=None, t=100.0, busy=0.5, attempt=0):
    ids = np.asarray(ids, np.int64)
    inputs = pa.record_batch({"sample_id": pa.array(ids)})
    return Dispatch(
        operator, 0, "tcp://w:1", step, ids, inputs, outputs, t - 1, t, busy, version, attempt
    )


def _rollout_out(versions, lengths):
    responses = pa.array([[1] * n for n in lengths], pa.list_(pa.int32()))
    return pa.record_batch(
        {"response_ids": responses, "policy_version": pa.array(versions, pa.int64())}
    )


EMPTY = pa.record_batch({"x": pa.array([], pa.int32())}).select([])


def _feed(live: LiveState, info: RunInfo) -> None:
    live.weights_published("actor", 0, {})  # before run_started, as executors do
    live.run_started(info)
    live.rows_added(0, pa.record_batch({"sample_id": pa.array([0, 1, 2, 3], pa.int64())}))
    live.dispatched(_dispatch("rollout", 0, [0, 1, 2, 3], _rollout_out([0, 0, 0, 0], [3, 1, 0, 2])))
    live.weights_published("actor", 2, {})
    # the trainer runs with version 2: these samples are two versions old
    live.dispatched(_dispatch("actor", 0, [0, 1, 2], EMPTY))
    live.dispatched(_dispatch("actor", 0, [3], EMPTY, attempt=1))
    live.weights_loaded("rollout", 1, 2)
    live.step_finished(
        {
            "step": 0,
            "samples": 4,
            "step_time": 1.5,
            "samples_per_s": 2.7,
            "reward": 0.25,
            "accuracy": float("nan"),
            "time/x": 1.0,
        }
    )


def test_live_state_counts_what_the_run_did(tmp_path):
    live = LiveState(clock=lambda: 101.0)
    _feed(live, _info(tmp_path))
    snap = live.snapshot()
    ops = snap["operators"]
    assert ops["prompts"]["produced"] == 4
    assert ops["rollout"]["consumed"] == 4 and ops["rollout"]["produced"] == 4
    assert ops["rollout"]["tokens"] == 6 and snap["totals"]["tokens"] == 6
    assert ops["actor"]["consumed"] == 4 and ops["actor"]["produced"] == 0
    assert snap["totals"]["trained"] == 4
    assert snap["totals"]["redelivered"] == 1 and snap["totals"]["redelivered_leases"] == 1
    assert snap["staleness"]["hist"][2] == 4 and snap["staleness"]["samples"] == 4
    assert snap["staleness"]["mean"] == 2.0
    assert snap["weights"] == {"published": {"actor": 2}, "loaded": {"rollout": {"1": 2}}}
    (step,) = snap["steps"]
    assert step["accuracy"] is None and "time/x" not in step  # NaN -> None; compact
    assert snap["header"]["order"][:2] == ["prompts", "rollout"]
    assert json.dumps(snap)  # JSON-able as is


def test_take_delta_hands_out_appended_items_once(tmp_path):
    live = LiveState(clock=lambda: 101.0)
    _feed(live, _info(tmp_path))
    first = live.take_delta()
    assert len(first["new_segments"]) == 3 and len(first["new_steps"]) == 1
    second = live.take_delta()
    assert second["new_segments"] == [] and second["new_steps"] == []
    live.give_back(first)  # a failed push: its items come again
    assert len(live.take_delta()["new_segments"]) == 3


def test_board_merges_deltas_and_serves_json(tmp_path):
    live = LiveState(clock=lambda: 101.0)
    _feed(live, _info(tmp_path))
    board = Board()
    assert board.view()["run"] is None
    assert board.update(live.run_id, live.take_delta()) is False  # no header yet
    board.start(live.header)
    assert board.update(live.run_id, live.take_delta())
    live.dispatched(_dispatch("reward", 0, [0, 1], EMPTY, t=101.0))
    assert board.update(live.run_id, live.take_delta())
    view = json.loads(board.view_json())
    assert view["run"]["workflow"] == "grpo"
    assert view["operators"]["reward"]["consumed"] == 2
    assert len(view["series"]) == board.updates
    assert board.view_json() is board.view_json()  # cached until the next change


def test_prometheus_families_are_named_asyncflow(tmp_path):
    prometheus_client = pytest.importorskip("prometheus_client")
    from asyncflow.runtime.observe.prometheus import families

    live = LiveState(clock=lambda: 101.0)
    _feed(live, _info(tmp_path))

    class One:
        def collect(self):
            return families(live.header, live.take_delta())

    registry = prometheus_client.CollectorRegistry()
    registry.register(One())
    text = prometheus_client.generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert all(n.startswith("asyncflow_") for n in names)
    assert 'asyncflow_samples_consumed_total{operator="actor"} 4.0' in text
    assert 'asyncflow_samples_produced_total{operator="prompts"} 4.0' in text
    assert "asyncflow_trained_samples_total 4.0" in text
    assert "asyncflow_leases_redelivered_total 1.0" in text
    assert 'asyncflow_staleness_bucket{le="1.0"} 0.0' in text
    assert 'asyncflow_staleness_bucket{le="2.0"} 4.0' in text
    assert 'asyncflow_weight_version{operator="actor"} 2.0' in text
    assert "asyncflow_step_time_seconds 1.5" in text


def test_page_embeds_state_safely():
    html = render_page(b'{"run": null, "x": "</script><b>"}').decode()
    assert "<\\/script><b>" in html and html.count("</script>") == 2
    assert page_url("http://127.0.0.1:8787/status") == "http://127.0.0.1:8787/asyncflow"
    assert page_url(None) is None


def test_token_count_reads_offsets_only():
    arr = pa.array([[1, 2], [], [3, 4, 5]], pa.list_(pa.int32()))
    batch = pa.record_batch({"response_ids": arr.slice(1)})
    assert token_count(batch) == 3
    assert token_count(pa.record_batch({"other": pa.array([1])})) == 0


RECORD = {"step": 0, "reward": 0.5, "accuracy": 0.25, "samples_per_s": 10.0, "step_time": 2.0}


@pytest.mark.parametrize("mode", ["plain", "json", "quiet", "rich"])
def test_progress_modes(mode):
    out = io.StringIO()
    console = make_console(mode, out, total_steps=4)
    console.info("hello")
    console.step(RECORD)
    console.step({**RECORD, "step": 1, "reward": float("nan")})
    console.close()
    text = out.getvalue()
    if mode == "quiet":
        assert text == ""
    elif mode == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert lines[0] == {"event": "info", "message": "hello"}
        assert lines[1]["event"] == "step" and lines[1]["total_steps"] == 4
        assert lines[1]["eta_s"] == pytest.approx(6.0)  # 2 s a step, 3 steps to go
        assert lines[2]["reward"] is None  # strict JSON
    else:
        assert "hello" in text and "step 1/4" in text and "reward 0.500" in text


def _csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_reporter_writes_jsonl_and_csv_and_truncates(tmp_path):
    reporter = RunReporter(tmp_path, 3, stream=io.StringIO())
    reporter.step(RECORD)
    reporter.step({**RECORD, "step": 1, "extra": 1.0})  # a new key rewrites the CSV
    reporter.step({**RECORD, "step": 2, "extra": 2.0})
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["extra"] == "" and rows[2]["extra"] == "2.0"
    reporter.truncate_after(0)
    reporter.close()
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0"] and [m["step"] for m in read_metrics(tmp_path)] == [0]
    assert format_step(RECORD, 3).startswith("step 1/3")


def _fake_run_dir(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    reporter = RunReporter(tmp_path, 3, stream=io.StringIO())
    log = DispatchLog(tmp_path)
    log.weights_published("actor", 0, {})
    log.run_started(_info(tmp_path))
    t = time.time()
    for step in range(3):
        log.dispatched(
            _dispatch(
                "rollout",
                step,
                [10 * step, 10 * step + 1],
                _rollout_out([step, step], [2, 3]),
                t=t + step,
            )
        )
        log.weights_published("actor", step + 1, {})
        log.dispatched(
            _dispatch("actor", step, [10 * step, 10 * step + 1], EMPTY, t=t + step + 0.5)
        )
        record = {**RECORD, "step": step, "staleness/mean": 1.0, "staleness/max": 1.0}
        reporter.step(record)
        log.step_finished(record)
    log.run_finished({"status": "finished"})
    reporter.close()
    (tmp_path / "evaluation.json").write_text(
        '{"before": {"accuracy": 0.3}, "after": {"accuracy": 0.6}}'
    )
    return tmp_path


def test_dispatch_log_records_the_timeline_and_staleness(tmp_path):
    events = read_dispatches(_fake_run_dir(tmp_path))
    assert events[0]["event"] == "run" and events[-1] == {"event": "end", "status": "finished"}
    trainer = [e for e in events if e.get("operator") == "actor"]
    assert [e["staleness"][1] for e in trainer] == [2, 2, 2]  # published v(k+1) - generated vk


def test_plot_command_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = _fake_run_dir(tmp_path / "run")
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "png")]) == 0
    written = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in written)
    assert names == ["reward_accuracy.png", "staleness.png", "throughput.png", "timeline.png"]
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_run_help_lists_watching_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--progress" in out and "--no-dashboard-page" in out


def test_tensorboard_scalars_when_the_package_is_there(tmp_path):
    pytest.importorskip("tensorboard")  # optional: never a dependency
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from asyncflow.runtime.observe.files import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path)
    writer.step_finished({**RECORD, "name": "text is skipped"})
    writer.step_finished({**RECORD, "step": 1, "reward": 0.75})
    writer.run_finished({"status": "finished"})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(0, 0.5), (1, 0.75)]
