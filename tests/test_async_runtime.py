"""The executors on a real LocalCluster: staleness bound, overlap, exactly-once
training, recovery from a killed worker, and failures that stop the run cleanly."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from asyncflow.errors import OperatorError
from asyncflow.runtime.events import RunObserver
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.report import read_metrics
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import grpo, ppo

pytestmark = pytest.mark.cluster

SMALL = grpo.GRPOConfig(
    steps=6, prompts_per_step=8, group_size=4, micro_batch_size=8, warmstart_steps=20
)


class Timeline(RunObserver):
    """Remembers every dispatch and trainer step end (driver-side wall clock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.dispatches = []
        self.trainer_steps: dict[int, float] = {}

    def dispatched(self, d):
        with self.lock:
            self.dispatches.append(d)

    def step_ended(self, operator, replica, step, metrics):
        import time

        if operator == "actor":
            with self.lock:
                self.trainer_steps[step] = time.time()


def _assert_exactly_once(result, steps, rows_per_step):
    trained = result.trained["actor"]
    assert sorted(trained) == list(range(steps))
    every = [i for step in range(steps) for i in trained[step]]
    assert len(every) == len(set(every)) == steps * rows_per_step  # none lost, none twice
    for step in range(steps):  # a step trains exactly its own rows
        ids = trained[step]
        assert ids == list(range(ids[0], ids[0] + rows_per_step))


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_async_run_respects_the_staleness_bound(dask_client, tmp_path, max_staleness):
    timeline = Timeline()
    recipe = grpo.recipe(SMALL, tmp_path)
    executor = AsyncExecutor(
        recipe, dask_client, tmp_path, max_staleness=max_staleness, observers=[timeline]
    )
    result = executor.run()

    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(SMALL.steps))
    for m in metrics:
        assert m["samples"] == 32
        assert m["actor/rows"] == 32.0
        assert 0 <= m["staleness/max"] <= max_staleness
        assert m["weight_version"] == m["step"] + 1
    _assert_exactly_once(result, SMALL.steps, 32)
    # every rollout micro-batch ran with weights at most `max_staleness` versions old
    for d in timeline.dispatches:
        if d.operator == "rollout":
            assert d.step - d.weight_version <= max_staleness
            versions = np.asarray(d.outputs.column("policy_version"))
            assert (versions == d.weight_version).all()
    assert result.after["accuracy"] >= 0.0


def test_rollout_of_the_next_step_overlaps_training(dask_client, tmp_path):
    """With s = 1 the rollout of step k+1 starts before the trainer finished step k."""
    timeline = Timeline()
    cfg = replace(SMALL, steps=5)
    executor = AsyncExecutor(
        grpo.recipe(cfg, tmp_path), dask_client, tmp_path, max_staleness=1, observers=[timeline]
    )
    executor.run()
    # async mode disaggregates by default: the trainer has a worker process of its own
    replicas = executor.pool.replicas
    trainer_workers = {r.worker for r in replicas["actor"]}
    others = {r.worker for name, rs in replicas.items() if name != "actor" for r in rs}
    assert trainer_workers and not trainer_workers & others
    ahead = [
        d
        for d in timeline.dispatches
        if d.operator == "rollout"
        and d.step >= 1
        and d.started < timeline.trainer_steps[d.step - 1]
    ]
    assert ahead, "no rollout ran ahead of the trainer"


def test_async_ppo_streams_two_trainers(dask_client, tmp_path):
    cfg = ppo.PPOConfig(steps=3, prompts_per_step=8, group_size=4, warmstart_steps=20)
    result = AsyncExecutor(ppo.recipe(cfg, tmp_path), dask_client, tmp_path, max_staleness=1).run()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["critic/rows"] == 32.0 and m["actor/rows"] == 32.0 for m in metrics)
    assert set(result.trained) == {"actor", "critic"}


class Planted(RunObserver):
    """Kills the worker process holding `operator` once `after` of its micro-batches ran."""

    def __init__(self, client, operator, after):
        self.client, self.operator, self.after = client, operator, after
        self.seen = 0
        self.killed: str | None = None
        self.executor = None

    def dispatched(self, d):
        if d.operator != self.operator or self.killed:
            return
        self.seen += 1
        if self.seen == self.after:
            pids = self.client.run(os.getpid)
            self.killed = d.worker
            os.kill(pids[d.worker], signal.SIGKILL)


@pytest.fixture
def own_cluster():
    """A cluster of our own: these tests kill its workers."""
    from asyncflow.runtime.cluster import ClusterConfig, connect

    with connect(ClusterConfig(n_workers=2, dashboard_address="127.0.0.1:0")) as client:
        yield client


@pytest.mark.parametrize(
    ("mode", "victim"), [("async", "actor"), ("async", "rollout"), ("sync", "actor")]
)
def test_a_killed_worker_is_survived_and_every_sample_trained_once(
    own_cluster, tmp_path, mode, victim
):
    cfg = replace(SMALL, steps=5)
    planted = Planted(own_cluster, victim, after=5)
    recipe = grpo.recipe(cfg, tmp_path)
    if mode == "async":
        executor = AsyncExecutor(
            recipe, own_cluster, tmp_path, max_staleness=1, observers=[planted]
        )
    else:
        executor = SyncExecutor(recipe, own_cluster, tmp_path, observers=[planted])
    result = executor.run()

    assert planted.killed is not None
    assert result.recoveries, "the run should say what it recovered from"
    assert any(planted.killed in message for message in result.recoveries)
    _assert_exactly_once(result, cfg.steps, 32)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(cfg.steps))
    assert all(m["actor/rows"] == 32.0 for m in metrics)  # no step trained twice its rows
    assert [m["weight_version"] for m in metrics] == [1, 2, 3, 4, 5]


def test_operator_error_stops_the_async_run_naming_samples(dask_client, tmp_path):
    from tests.test_end_to_end import NaNReward

    cfg = replace(SMALL, steps=3)
    recipe = grpo.recipe(cfg, tmp_path)
    wf = recipe.workflow
    rebuilt = type(wf)("grpo-nan")
    for node in wf.nodes:
        operator = NaNReward() if node.name == "reward" else node.operator
        rebuilt.add(node.name, operator, replicas=node.replicas)
    for source, target in wf.weight_syncs:
        rebuilt.sync_weights(source, to=[target])
    recipe.workflow = rebuilt

    timeline = Timeline()
    executor = AsyncExecutor(recipe, dask_client, tmp_path, max_staleness=1, observers=[timeline])
    with pytest.raises(OperatorError) as info:
        executor.run()
    assert "'reward' holds NaN" in str(info.value)
    assert info.value.sample_ids and all(i % 3 == 0 for i in info.value.sample_ids)
    # nothing produced is lost: every finished rollout's rows are in the queue, readable
    generated = {
        int(i) for d in timeline.dispatches if d.operator == "rollout" for i in d.sample_ids
    }
    ready = set()
    for step in executor.queue.partitions():
        if "response_ids" in executor.queue.schema(step).names:
            ids = executor.queue.ready(step, ["response_ids"])
            executor.queue.gather(step, ["prompt_ids", "response_ids"], ids)
            ready |= {int(i) for i in ids}
    assert generated and generated == ready


def test_placement_needs_a_worker_offering_the_resources(dask_client, tmp_path):
    from asyncflow.errors import AsyncflowError

    cfg = replace(SMALL, steps=1)
    recipe = grpo.recipe(cfg, tmp_path)
    wf = recipe.workflow
    rebuilt = type(wf)("grpo-gpu")
    for node in wf.nodes:
        resources = {"GPU": 1} if node.name == "actor" else {"threads": 1}
        rebuilt.add(node.name, node.operator, replicas=node.replicas, resources=resources)
    for source, target in wf.weight_syncs:
        rebuilt.sync_weights(source, to=[target])
    recipe.workflow = rebuilt
    with pytest.raises(AsyncflowError, match=r"'actor' needs resources \{'GPU': 1.0\}"):
        AsyncExecutor(recipe, dask_client, tmp_path).run()


def test_async_checkpoint_and_resume_continue_the_run(dask_client, tmp_path):
    """Async checkpoints hold the trainer's state at that step (not whatever it reached
    since) and its targets' weights of the same version; resuming continues from there."""
    cfg = replace(SMALL, steps=4)
    AsyncExecutor(
        grpo.recipe(replace(cfg, steps=3), tmp_path),
        dask_client,
        tmp_path,
        max_staleness=2,
        checkpoint_every=2,
    ).run()
    manifest = tmp_path / "checkpoints" / "step-000001" / "manifest.json"
    assert manifest.exists()
    import json

    from safetensors.torch import load_file

    saved = json.loads((tmp_path / "checkpoints" / "step-000001" / "actor-0.json").read_text())
    assert saved["version"] == 2  # two optimizer steps, although the trainer ran on
    rollout = json.loads((tmp_path / "checkpoints" / "step-000001" / "rollout-0.json").read_text())
    assert rollout["version"] == 2
    actor = load_file(str(tmp_path / "checkpoints" / "step-000001" / "actor-0.safetensors"))
    rollout_w = load_file(str(tmp_path / "checkpoints" / "step-000001" / "rollout-0.safetensors"))
    assert all(torch.equal(actor[k], rollout_w[k]) for k in rollout_w)

    resumed = AsyncExecutor(
        grpo.recipe(cfg, tmp_path), dask_client, tmp_path, max_staleness=2, resume=True
    ).run()
    assert [r["step"] for r in resumed.history] == [2, 3]
    assert [m["step"] for m in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert [m["weight_version"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    first_resumed = min(resumed.trained["actor"][2])
    assert first_resumed == json.loads(manifest.read_text())["next_sample_id"]


def test_replica_calls_go_straight_to_the_worker_in_order(dask_client, tmp_path):
    """`ReplicaPool.submit` talks to the replica's worker directly (not through the
    scheduler), returns at once, runs `before` calls first and in order, and hands
    operator errors back as they were raised."""
    import torch

    from asyncflow.runtime.replicas import ReplicaPool
    from asyncflow.workflows import simulated as sim

    graph = sim.build(sim.SimConfig(rollout_replicas=2, ref_replicas=0, reward_replicas=1)).build()
    pool = ReplicaPool(dask_client, graph, seed=0, run_dir=tmp_path, token="direct")
    try:
        pool.place_all()
        assert pool._direct  # an embedded cluster's workers are reachable
        a, b = pool.replicas["rollout"]
        loads = [("set_weights", (v, {"w": torch.full((2,), float(v))})) for v in (3, 5)]
        calls = [pool.submit(r, "get_weights", before=loads) for r in (a, b)]
        for call in calls:
            version, weights = call.result(timeout=30)
            assert version == 5 and weights["w"].tolist() == [5.0, 5.0]
            assert call.started > 0
        assert pool.call_all([a, b], "stats") == [{"busy_seconds": 0.0, "calls": 0.0}] * 2
        with pytest.raises(AttributeError):
            pool.call(a, "call", "no_such_method")
    finally:
        pool.close()
