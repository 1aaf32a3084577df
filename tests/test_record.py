"""Recording: what a run writes into RUN_DIR/record, reading it back (never unpickling),
inspecting it, exporting a step, the size cap, damaged files, and the command line."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from asyncflow.cli import main
from asyncflow.runtime.events import RunInfo
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.record import (
    Recorder,
    RecordError,
    Replayer,
    RunRecord,
    Tolerance,
    inspection,
    layout,
)
from asyncflow.workflows import grpo

CFG = grpo.GRPOConfig(
    steps=3, prompts_per_step=8, group_size=4, micro_batch_size=8, warmstart_steps=20
)


def record_run(client, run_dir, cfg=CFG, **recorder):
    SyncExecutor(
        grpo.recipe(cfg, run_dir),
        client,
        run_dir,
        observers=[Recorder(run_dir, **recorder)],
        config=dataclasses.asdict(cfg),
        workflow_name="grpo",
    ).run()
    return run_dir


@pytest.fixture(scope="module")
def run_dir(dask_client, tmp_path_factory):
    return record_run(dask_client, tmp_path_factory.mktemp("recorded"))


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2_000_000_000), ("500MB", 500_000_000), ("1.5GiB", int(1.5 * 2**30)), ("none", None)],
)
def test_parse_size(text, size):
    assert layout.parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2XB", "0", "-1MB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError, match="record cap"):
        layout.parse_size(text)


# --- what a run writes --------------------------------------------------------------------


@pytest.mark.cluster
def test_a_run_records_manifest_puts_dispatches_and_states(run_dir):
    record = RunRecord(run_dir)
    m = record.manifest
    workflow = json.loads((run_dir / "workflow.json").read_text())
    assert m["workflow"] == workflow and m["workflow_hash"] == layout.workflow_hash(workflow)
    assert m["workflow_name"] == "grpo" and m["config"]["steps"] == 3
    assert m["recipe"]["seed"] == 0 and m["seeds"]["run_seed"] == 0
    assert m["operators"]["rollout"]["seeds"] == [0, 1]  # seed * 1000 + replica
    assert m["operators"]["rollout"]["class"] == "asyncflow.operators.rollout:Generate"
    assert m["operators"]["rollout"]["code_sha256"].startswith("sha256:")
    assert m["operators"]["rollout"]["weights_from"] == "actor"
    assert m["operators"]["actor"]["trains"] and m["versions"]["torch"]
    assert record.status() == "finished"
    assert record.steps() == [0, 1, 2]
    for k in record.steps():
        step = record.step(k)
        assert step.complete and step.metrics["step"] == k
        ids = step.source().column("sample_id").to_pylist()
        assert ids == list(range(32 * k, 32 * (k + 1)))
        for name in ("rollout", "reward", "advantage", "actor"):
            dispatches = step.dispatches(name)
            seen = [i for d in dispatches for i in step.output(d).column("sample_id").to_pylist()]
            assert sorted(seen) == ids  # every row exactly once, in recorded micro-batches
            assert all(d.worker.startswith("tcp://127.0.0.1:") for d in dispatches)
        assert len(step.dispatches("rollout")) == 4  # 32 rows in micro-batches of 8
        assert {d.replica for d in step.dispatches("rollout")} == {0, 1}
        # what the rollout put is what the step's metrics were computed from
        outputs = step.outputs("rollout")
        assert set(outputs.column_names) == {
            "sample_id",
            "response_ids",
            "rollout_logprob",
            "policy_version",
        }
        assert step.end_step_metrics("actor")[0]["actor/rows"] == 32.0
    # every step's weights version and digest; full states at keyframes (first and last
    # here: one every 10 steps by default)
    versions = record.versions("actor")
    assert [versions[k]["version"] for k in (-1, 0, 1, 2)] == [0, 1, 2, 3]
    assert sorted(record.states("actor")) == [-1, 2]
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "final.safetensors"))
    assert layout.weights_digest(final, prefix="") == versions[2]["digest"]
    tensors, meta = record.state("actor", 2)
    assert meta["version"] == 3 and any(k.startswith("optim.") for k in tensors)
    assert all(torch.equal(tensors[f"model.{k}"], v) for k, v in final.items())


@pytest.mark.cluster
def test_reading_a_record_never_unpickles(run_dir, tmp_path, monkeypatch):
    Replayer(run_dir)  # import everything first; then forbid unpickling

    def forbidden(*args, **kwargs):
        raise AssertionError("a record was unpickled")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    record = RunRecord(run_dir)
    inspection.format_summary(inspection.summary(record))
    inspection.lineage(record, 40)
    inspection.export_step(record, 1, tmp_path / "step.parquet")
    record.state("actor", 2)
    Replayer(run_dir).trainer_state("actor", 1)  # rebuilt from the keyframe after step -1
    assert Replayer(run_dir).replay_step(1).exact


# --- inspect and export -------------------------------------------------------------------


@pytest.mark.cluster
def test_inspect_lists_steps_operators_and_columns(run_dir, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "workflow: grpo" in out and "sync mode" in out and "run finished" in out
    assert "recorded steps: 0-2 (3 finished, 0 cut short)" in out
    assert "trainer states: actor after steps -1..2 (weight versions 0..3, digests)" in out
    assert "full states (keyframes) after steps -1, 2" in out
    for fragment in ("rollout    Generate", "weights from actor", "response_ids", "list<int32>"):
        assert fragment in out
    assert main(["inspect", str(run_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in summary["steps"]] == [0, 1, 2]
    assert summary["steps"][1]["weight_versions"]["rollout"] == [1]
    by_name = {o["operator"]: o for o in summary["operators"]}
    assert by_name["rollout"]["micro_batches"] == 12 and by_name["rollout"]["rows"] == 96
    assert summary["problems"] == []


@pytest.mark.cluster
def test_sample_lineage_spans_every_operator(run_dir, capsys):
    assert main(["inspect", str(run_dir), "--sample", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sample 40: step 1")
    for fragment in (
        "prompts (source)",
        "prompt_ids = [1,",  # the prompt, and its text
        "+",
        "rollout: micro-batch",
        "response_ids = ",
        "rollout_logprob = [",
        "policy_version = 1",
        "reward = ",
        "advantage = ",
        "trained on it in step 1 -> weights v2",
        "on tcp://127.0.0.1:",
    ):
        assert fragment in out, fragment
    info = inspection.lineage(RunRecord(run_dir), 40, inspection.find_decoder(RunRecord(run_dir)))
    source = info["operators"][0]
    assert source["text"]["prompt_ids"].endswith("=")  # decoded with the task's tokenizer
    rollout = next(op for op in info["operators"] if op["operator"] == "rollout")
    assert rollout["weight_version"] == 1 and rollout["replica"] in (0, 1)


@pytest.mark.cluster
def test_export_step_to_parquet(run_dir, tmp_path, capsys):
    out = tmp_path / "step1.parquet"
    assert main(["inspect", str(run_dir), "--export-step", "1", str(out)]) == 0
    assert "wrote 32 rows" in capsys.readouterr().out
    table = pq.read_table(out)
    assert table.num_rows == 32
    assert table.column("sample_id").to_pylist() == list(range(32, 64))
    assert set(table.column("step").to_pylist()) == {1}
    for column in ("prompt_ids", "response_ids", "reward", "advantage", "rollout_replica"):
        assert column in table.column_names
    step = RunRecord(run_dir).step(1)
    recorded = step.columns(["response_ids", "reward"], list(range(32, 64)))
    assert table.select(["response_ids", "reward"]).equals(
        recorded.select(["response_ids", "reward"])
    )
    assert set(table.column("rollout_weight_version").to_pylist()) == {1}


# --- damage -------------------------------------------------------------------------------


@pytest.mark.cluster
def test_damaged_files_give_clear_errors_and_the_rest_stays_readable(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    record_root = copy / "record"
    rollout = record_root / "steps" / "000001" / "rollout.arrow"
    rollout.write_bytes(rollout.read_bytes()[: rollout.stat().st_size // 2])  # truncated
    events = record_root / "steps" / "000002" / "events.jsonl"
    events.write_text(events.read_text() + '{"kind": "dispatch", "seq": 99')  # cut mid-line
    state = record_root / "states" / "actor" / "step-000002.safetensors"
    state.write_bytes(b"\0" * 64)  # corrupt

    # the listing names every damaged file, and lists everything else
    assert main(["inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "recorded steps: 0-2 (3 finished" in out
    assert "problems (the rest of the record is readable):" in out
    assert str(rollout) in out and "truncated or corrupt" in out
    assert f"{events}:" in out and "damaged line skipped" in out

    # what needs the damaged file fails naming it; what does not, works
    assert main(["replay", str(copy), "--step", "1", "--operator", "rollout"]) == 2
    err = capsys.readouterr().err
    assert str(rollout) in err and "record batch" in err and "truncated" in err
    with pytest.raises(RecordError, match=r"step-000002\.safetensors: unreadable safetensors"):
        RunRecord(copy).state("actor", 2)
    replayer = Replayer(copy)
    assert replayer.replay_step(0).exact
    # the same step's operators that do not read the rollout's columns still replay
    assert replayer.replay_operator("advantage", 1).exact
    with pytest.raises(RecordError, match=r"rollout\.arrow"):  # the reward reads response_ids
        replayer.replay_operator("reward", 1)
    assert replayer.replay_operator("reward", 2).exact  # the damaged events file's step
    # the rollout of step 2 ran with the weights after step 1, rebuilt from the keyframe
    # after step -1 through step 1's update, which reads the damaged rollout file
    with pytest.raises(RecordError, match=r"rollout\.arrow"):
        replayer.replay_operator("rollout", 2)

    (record_root / "manifest.json").write_text("{not json")
    with pytest.raises(RecordError, match=r"manifest.json: unreadable JSON"):
        RunRecord(copy)
    shutil.rmtree(record_root)
    assert main(["inspect", str(copy)]) == 2
    assert "no run record here" in capsys.readouterr().err


# --- the cap, switching off, failures -----------------------------------------------------


@pytest.mark.cluster
def test_the_cap_drops_the_oldest_steps(dask_client, tmp_path, capsys):
    # a full trainer state is 1.25 MB (0.4 MB before training: no optimizer moments yet),
    # a step's data ~20 kB; keyframes every 2 steps: after steps -1, 1, 3, 5, 7 (5.4 MB)
    record_run(dask_client, tmp_path, replace(CFG, steps=8), cap="5MB", state_every=2)
    record = RunRecord(tmp_path)
    assert record.size_bytes() <= 5_000_000
    # steps go a keyframe's worth at a time, so the kept ones stay replayable
    assert record.evicted() == [0, 1, 2, 3] and record.steps() == [4, 5, 6, 7]
    assert sorted(record.states("actor")) == [3, 5, 7]
    assert main(["inspect", str(tmp_path)]) == 0
    assert "dropped under the cap: 0-3" in capsys.readouterr().out
    with pytest.raises(RecordError, match="dropped to stay under the record cap"):
        record.step(1)
    replayer = Replayer(tmp_path, tolerance=Tolerance.exact())
    assert replayer.replay_step(7).exact  # its update starts from a state rebuilt from 5
    assert replayer.replay_step(4).exact  # from the keyframe after step 3


@pytest.mark.cluster
def test_cli_records_by_default_and_not_with_no_record(dask_client, tmp_path, capsys):
    common = ["--steps", "1", "--scheduler", dask_client.scheduler.address]
    common += ["--set", "warmstart_steps=5", "--set", "prompts_per_step=4"]
    common += ["--set", "group_size=2", "--set", "micro_batch_size=4"]
    assert main(["run", "grpo", "--run-dir", str(tmp_path / "on"), *common]) == 0
    assert RunRecord(tmp_path / "on").step(0).complete
    assert main(["replay", str(tmp_path / "on"), "--step", "0", "--operator", "rollout"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["run", "grpo", "--run-dir", str(tmp_path / "off"), "--no-record", *common]) == 0
    assert (tmp_path / "off" / "metrics.jsonl").exists()
    assert not (tmp_path / "off" / "record").exists()
    capsys.readouterr()
    assert main(["run", "grpo", "--run-dir", str(tmp_path / "bad"), "--record-cap", "lots"]) == 2
    assert "--record-cap" in capsys.readouterr().err


def test_a_failing_writer_switches_recording_off_without_raising(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the record directory should go")
    recipe = grpo.recipe(CFG, tmp_path)
    graph = recipe.workflow.build()
    info = RunInfo(blocker, "sync", graph, recipe, queue=None, dashboard=None, scheduler="")
    recorder = Recorder()
    recorder.run_started(info)  # the writer thread fails to create the directory
    recorder.rows_added(0, pa.record_batch({"sample_id": pa.array([0], pa.int64())}))
    recorder.run_finished({"status": "finished"})
    assert isinstance(recorder.error, OSError)


@pytest.mark.cluster
def test_a_resumed_run_continues_its_record(dask_client, tmp_path):
    cfg = replace(CFG, steps=4)
    options = {"config": dataclasses.asdict(cfg), "workflow_name": "grpo"}
    # the interrupted run: 3 steps, a checkpoint after step index 1; its step 2 is redone
    SyncExecutor(
        grpo.recipe(replace(cfg, steps=3), tmp_path),
        dask_client,
        tmp_path,
        observers=[Recorder(tmp_path)],
        checkpoint_every=2,
        **options,
    ).run()
    first = RunRecord(tmp_path).step(2).source().column("sample_id").to_pylist()
    SyncExecutor(
        grpo.recipe(cfg, tmp_path),
        dask_client,
        tmp_path,
        observers=[Recorder(tmp_path)],
        resume=True,
        **options,
    ).run()
    record = RunRecord(tmp_path)
    assert [s["first_step"] for s in record.manifest["segments"]] == [0, 2]
    assert record.steps() == [0, 1, 2, 3] and all(record.step(k).complete for k in range(4))
    assert record.step(2).source().column("sample_id").to_pylist() == first  # same ids
    # keyframes: the start, the state the resume started from, the end
    assert sorted(record.states("actor")) == [-1, 1, 3]
    assert sorted(record.versions("actor")) == [-1, 0, 1, 2, 3]
    replayer = Replayer(tmp_path, tolerance=Tolerance.exact())
    for step in (1, 2, 3):  # before and after the resume
        assert replayer.replay_step(step).exact
