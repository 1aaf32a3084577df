"""The simulated workload: its cost model and bound arithmetic (exact values), and a tiny
run of it in both modes on the real runtime (no timing asserted)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.report import read_metrics
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import simulated as sim

# every response exactly the median (400 tokens): every cost is hand-computable
FLAT = sim.CostModel(prompt_sigma=0.0, sample_sigma=0.0)
# rollout micro-batch of 8 rows of 400 tokens: 0.05 + 3e-4 * 400 = 0.17 s
# ref, per row: 3e-6 * (256 + 400) = 0.001968 s; reward, per row: 0.001 s
# actor, per row: 2e-5 * 656 / train_workers; plus 0.05 s per step


def test_response_lengths_are_seeded_clipped_and_long_tailed():
    cfg = sim.SimConfig(groups_per_step=512)
    a, b = sim.response_lengths(cfg, 3), sim.response_lengths(cfg, 3)
    assert a.dtype == np.int64 and len(a) == 512 * 8
    assert (a == b).all() and not (a == sim.response_lengths(cfg, 4)).all()
    assert a.min() >= cfg.cost.min_response and a.max() <= cfg.cost.max_response
    assert a.max() == cfg.cost.max_response  # the tail reaches the cap
    assert np.percentile(a, 99) > 4 * np.median(a)  # long tail
    # the samples of one prompt share its difficulty
    shared = replace(cfg, cost=replace(cfg.cost, sample_sigma=0.0))
    groups = sim.response_lengths(shared, 0).reshape(-1, cfg.group_size)
    assert (groups == groups[:, :1]).all() and len(np.unique(groups[:, 0])) > 1
    assert (sim.response_lengths(replace(cfg, cost=FLAT), 0) == 400).all()


def test_stage_work_and_bottleneck_bound_exact():
    cfg = sim.SimConfig(
        steps=3,
        groups_per_step=2,
        rollout_replicas=2,
        ref_replicas=1,
        reward_replicas=1,
        train_workers=2,
        cost=FLAT,
    )
    work = sim.stage_work(cfg, sim.response_lengths(cfg, 0))
    assert work == pytest.approx(
        {"rollout": 0.34, "ref": 0.031488, "reward": 0.016, "actor": 0.10496 + 0.05}
    )
    bound = sim.bottleneck_bound(cfg, range(3))
    assert bound["samples"] == 48
    assert bound["work_seconds"]["rollout"] == pytest.approx(1.02)
    # capacity = replicas / mean seconds per sample = samples * replicas / work
    assert bound["capacity"] == pytest.approx(
        {
            "rollout": 2 / (0.17 / 8),
            "ref": 1 / 0.001968,
            "reward": 1 / 0.001,
            "actor": 48 / (3 * 0.15496),
        }
    )
    assert bound["bottleneck"] == "rollout"
    assert bound["samples_per_s"] == pytest.approx(2 / (0.17 / 8))
    # no ref stage: it is not a stage, and not a bottleneck
    no_ref = replace(cfg, ref_replicas=0)
    assert no_ref.stages() == ("rollout", "reward", "actor")
    assert set(sim.bottleneck_bound(no_ref, range(3))["capacity"]) == set(no_ref.stages())


def test_rollout_waits_for_the_longest_response_and_sync_takes_the_busiest_replica():
    cfg = sim.SimConfig(rollout_replicas=2, ref_replicas=1, reward_replicas=2, train_workers=1)
    lengths = np.array([100] * 8 + [1000] * 7 + [50] + [100] * 8, dtype=np.int64)
    c = cfg.cost
    assert c.rollout_seconds(lengths[8:16]) == pytest.approx(0.05 + 3e-4 * 1000)
    model = sim.sync_step_model(cfg, lengths)
    # micro-batch i goes to replica i % 2: replica 0 runs batches 0 and 2, replica 1 batch 1
    assert model["rollout"] == pytest.approx(max(2 * (0.05 + 0.03), 0.05 + 0.3))
    assert model["ref"] == pytest.approx(3e-6 * float(np.sum(lengths + 256)))
    assert model["reward"] == pytest.approx(0.016)  # replica 0: two batches of 8 rows
    assert model["actor"] == pytest.approx(2e-5 * float(np.sum(lengths + 256)) + 0.05)
    assert model["total"] == pytest.approx(
        sum(model[s] for s in ("rollout", "ref", "reward", "actor"))
    )


def test_async_schedule_model_exact():
    cfg = sim.SimConfig(
        groups_per_step=1,
        rollout_replicas=1,
        ref_replicas=0,
        reward_replicas=1,
        train_workers=1,
        cost=FLAT,
    )
    # rollout 0.17 per step, reward 0.008, train 8 * 2e-5 * 656 = 0.10496, end_step 0.05
    # s = 1: both steps' rollouts run back to back from t = 0
    s1 = sim.async_schedule_model(cfg, range(2), max_staleness=1)
    assert s1 == pytest.approx({0: 0.178 + 0.10496 + 0.05, 1: 0.348 + 0.10496 + 0.05})
    # s = 0: step 1's rows enter only once step 0 is trained
    s0 = sim.async_schedule_model(cfg, range(2), max_staleness=0)
    first = 0.178 + 0.10496 + 0.05
    assert s0 == pytest.approx({0: first, 1: first + 0.178 + 0.10496 + 0.05})
    # never faster than the bound
    wide = sim.SimConfig(steps=6, groups_per_step=16, rollout_replicas=4, train_workers=2)
    finish = sim.async_schedule_model(wide, range(6), max_staleness=1)
    bound = sim.bottleneck_bound(wide, range(6))
    assert bound["samples"] / finish[5] <= bound["samples_per_s"]


def test_workflow_validates():
    graph = sim.build(sim.SimConfig()).build()
    assert graph.order()[0] == "prompts" and list(graph.weight_syncs) == [("actor", "rollout")]
    assert sim.build(sim.SimConfig(ref_replicas=0)).build().nodes.keys() == {
        "prompts",
        "rollout",
        "reward",
        "actor",
    }


TINY = sim.SimConfig(
    steps=3,
    groups_per_step=4,
    group_size=4,
    micro_batch_size=4,
    rollout_replicas=4,
    ref_replicas=2,
    reward_replicas=2,
    train_workers=1,
    cost=sim.CostModel(
        gen_call_s=0.001,
        gen_token_s=1e-5,
        ref_token_s=1e-6,
        reward_sample_s=1e-4,
        train_token_s=1e-6,
        train_step_s=0.001,
    ),
)


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_simulated_workflow_runs_in_both_modes(dask_client, tmp_path, mode):
    recipe = sim.recipe(TINY)
    if mode == "sync":
        executor = SyncExecutor(recipe, dask_client, tmp_path)
    else:
        executor = AsyncExecutor(recipe, dask_client, tmp_path, max_staleness=1)
    result = executor.run()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert m["samples"] == 16 and m["actor/rows"] == 16.0
        assert m["weight_version"] == m["step"] + 1
        assert 0 <= m["staleness/max"] <= (0 if mode == "sync" else 1)
        assert m["response_len"] == pytest.approx(
            float(np.mean(sim.response_lengths(TINY, m["step"])))
        )
    trained = [i for ids in result.trained["actor"].values() for i in ids]
    assert sorted(trained) == list(range(48))  # every sample trained exactly once
    assert (tmp_path / "final.safetensors").exists()
