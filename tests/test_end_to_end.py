"""End to end on a real LocalCluster with worker processes: the GRPO workflow and its failures."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from typing import ClassVar

import pyarrow as pa
import pytest
import torch

from asyncflow.errors import OperatorError
from asyncflow.operators.base import Operator
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.report import read_metrics
from asyncflow.workflows import grpo

pytestmark = pytest.mark.cluster

SMALL = grpo.GRPOConfig(steps=2, prompts_per_step=8, group_size=4, warmstart_steps=20)


def test_two_step_grpo_run(dask_client, tmp_path):
    result = SyncExecutor(grpo.recipe(SMALL, tmp_path), dask_client, tmp_path).run()

    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["samples"] == 8 * 4  # every row of the step reached the metrics, none twice
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["samples_per_s"] > 0
        assert m["actor/rows"] == 32.0  # the trainer saw each row exactly once
    # rollout used the weights published after the previous step
    assert [m["policy_version"] for m in metrics] == [0.0, 1.0]
    assert [m["weight_version"] for m in metrics] == [1, 2]
    assert (tmp_path / "final.safetensors").exists()
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(evaluation) == {"before", "after"}
    assert result.after["accuracy"] == evaluation["after"]["accuracy"]
    workflow = json.loads((tmp_path / "workflow.json").read_text())
    assert [op["name"] for op in workflow["operators"]][:2] == ["prompts", "rollout"]


def test_kl_to_reference_adds_the_ref_operator(dask_client, tmp_path):
    cfg = replace(SMALL, steps=1, kl_coef=0.05)
    SyncExecutor(grpo.recipe(cfg, tmp_path), dask_client, tmp_path).run()
    (record,) = read_metrics(tmp_path)
    assert "time/ref" in record
    # first step: the policy still equals the reference, so the KL estimate is ~0
    assert record["actor/kl"] == pytest.approx(0.0, abs=1e-6)


class NaNReward(Operator):
    """A planted bug: rewards NaN for every third sample."""

    reads: ClassVar = {"response_ids": "list<int32>"}
    writes: ClassVar = {"reward": "float32", "correct": "float32"}

    def __call__(self, batch: pa.RecordBatch):
        ids = batch.column("sample_id").to_pylist()
        values = [float("nan") if i % 3 == 0 else 0.0 for i in ids]
        return {"reward": pa.array(values, pa.float32()), "correct": pa.array(values, pa.float32())}


def test_bad_operator_output_fails_the_step_naming_samples(dask_client, tmp_path):
    cfg = replace(SMALL, steps=2)
    recipe = grpo.recipe(cfg, tmp_path)
    wf = recipe.workflow
    # swap the reward operator for the buggy one, keeping the rest of the workflow
    nodes = [n for n in wf.nodes if n.name != "reward"]
    rebuilt = type(wf)("grpo-nan")
    for node in nodes:
        rebuilt.add(node.name, node.operator, replicas=node.replicas)
        if node.name == "rollout":
            rebuilt.add("reward", NaNReward())
    for source, target in wf.weight_syncs:
        rebuilt.sync_weights(source, to=[target])
    recipe.workflow = rebuilt

    executor = SyncExecutor(recipe, dask_client, tmp_path)
    with pytest.raises(OperatorError) as info:
        executor.run()
    message = str(info.value)
    assert "'reward'" in message and "'reward' holds NaN" in message
    assert info.value.sample_ids and all(i % 3 == 0 for i in info.value.sample_ids)
    # nothing already produced was lost: the rollout's columns are still in the queue
    rows = executor.queue.gather(0, ["prompt_ids", "response_ids"])
    assert rows.num_rows == 32


def test_cli_smoke_run(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "asyncflow.cli", "run", "grpo", "--steps", "2"]
    cmd += ["--run-dir", str(run_dir), "--set", "warmstart_steps=20"]
    cmd += ["--set", "prompts_per_step=8", "--set", "group_size=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("dashboard: http://127.0.0.1:") for line in lines)
    assert sum(line.startswith("step ") for line in lines) == 2
    assert lines[-1].startswith("held-out accuracy: ") and "->" in lines[-1]
    assert len(read_metrics(run_dir)) == 2
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 2


def _comparable(records):
    """Metrics that must match exactly between runs (not timings)."""
    drop = ("time/", "step_time", "samples_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in records]


def test_resume_from_checkpoint_equals_an_uninterrupted_run(dask_client, tmp_path):
    # a warm start good enough that every step has reward signal, so weights really move
    cfg = replace(SMALL, steps=4, warmstart_steps=150, prompts_per_step=16)
    full, part = tmp_path / "full", tmp_path / "part"
    SyncExecutor(grpo.recipe(cfg, full), dask_client, full).run()
    # the interrupted run: 3 steps, checkpoint after step 2 (index 1)
    SyncExecutor(
        grpo.recipe(replace(cfg, steps=3), part), dask_client, part, checkpoint_every=2
    ).run()
    assert len(read_metrics(part)) == 3
    resumed = SyncExecutor(grpo.recipe(cfg, part), dask_client, part, resume=True).run()
    assert [r["step"] for r in resumed.history] == [2, 3]  # step 3 (index 2) redone
    assert _comparable(read_metrics(part)) == _comparable(read_metrics(full))
    assert any(r["actor/grad_norm"] > 0 for r in read_metrics(full)[2:])  # not a trivial match
    # the resumed run ends with exactly the uninterrupted run's weights, which moved
    from safetensors.torch import load_file

    final_full, final_part = (load_file(str(d / "final.safetensors")) for d in (full, part))
    start = load_file(str(full / "warmstart.safetensors"))
    assert all(torch.equal(final_full[k], final_part[k]) for k in final_full)
    assert any(not torch.equal(final_full[k], start[k]) for k in start)
    assert (part / "checkpoints" / "step-000001" / "manifest.json").exists()


def test_resume_without_checkpoint_is_a_clear_error(dask_client, tmp_path):
    from asyncflow.errors import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        SyncExecutor(grpo.recipe(SMALL, tmp_path), dask_client, tmp_path, resume=True).run()


def test_ppo_with_critic_and_gae_runs_and_syncs_both_trainers(dask_client, tmp_path):
    from asyncflow.workflows import ppo

    cfg = ppo.PPOConfig(steps=2, prompts_per_step=8, group_size=2, warmstart_steps=20)
    executor = SyncExecutor(ppo.recipe(cfg, tmp_path), dask_client, tmp_path)
    executor.run()
    metrics = read_metrics(tmp_path)
    assert [m["samples"] for m in metrics] == [16, 16]
    assert any(key.startswith("critic/") for key in metrics[-1])
    # the critic published its weights to the values operator after each step
    critic_version, critic_weights = executor.hosts["critic"][0].get_weights().result()
    values_version, values_weights = executor.hosts["values"][0].get_weights().result()
    assert critic_version == values_version == 2
    assert all(torch.equal(critic_weights[k], values_weights[k]) for k in critic_weights)
