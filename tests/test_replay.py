"""Replay: recorded operators re-run in-process on exactly their inputs reproduce their
outputs, planted nondeterminism and bugs are caught at the right step and rows, crashed
runs stay replayable, and generation tokens depend on the row, not on the batching."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from asyncflow.cli import main
from asyncflow.errors import OperatorError
from asyncflow.operators.base import OperatorContext
from asyncflow.operators.generation import SamplingParams
from asyncflow.operators.model import ModelConfig
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.rollout import Generate
from asyncflow.operators.scoring import Reward
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.record import Recorder, Replayer, RunRecord, Tolerance
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import grpo
from asyncflow.workflows.tasks.arithmetic import correct_sum

pytestmark = pytest.mark.cluster

# a warm start good enough that rewards vary within groups, so the update really moves
CFG = grpo.GRPOConfig(
    steps=3,
    prompts_per_step=8,
    group_size=4,
    micro_batch_size=8,
    warmstart_steps=150,
    kl_coef=0.05,
)
QUICK = replace(CFG, steps=2, warmstart_steps=20, kl_coef=0.0)


def record_run(client, run_dir, cfg, *, executor=SyncExecutor, **kwargs):
    """A recorded run of the registry's grpo workflow, as `asyncflow run grpo` starts it."""
    return executor(
        grpo.recipe(cfg, run_dir),
        client,
        run_dir,
        observers=[Recorder(run_dir)],
        config=dataclasses.asdict(cfg),
        workflow_name="grpo",
        **kwargs,
    ).run()


@pytest.fixture(scope="module")
def sync_run(dask_client, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sync-run")
    record_run(dask_client, run_dir, CFG)
    return run_dir


def test_replay_reproduces_every_operator_and_the_update_exactly(sync_run):
    replayer = Replayer(sync_run, tolerance=Tolerance.exact())
    assert replayer.warnings == []
    results = replayer.replay_run()
    assert [r.step for r in results] == [0, 1, 2]
    for result in results:
        names = [o.operator for o in result.operators]
        assert names == ["prompts", "rollout", "ref", "reward", "advantage", "actor"]
        for report in result.operators:
            assert report.exact, (result.step, report.operator, report.errors)
            assert all(c.status == "identical" for c in report.columns)
            if report.operator != "prompts":  # every micro-batch's inputs rebuilt exactly
                assert report.inputs_verified == report.dispatches > 0
        rollout = next(o for o in result.operators if o.operator == "rollout")
        assert rollout.dispatches == 4 and rollout.replicas == [0, 1]  # 32 rows / 8, 2 replicas
        assert rollout.weight_versions == [result.step]  # sync: the weights after step - 1
        actor = next(o for o in result.operators if o.operator == "actor")
        assert actor.state and all(v.ok and v.max_abs_diff == 0 for v in actor.state)
        if result.step == 2:  # the last step's state is on disk: every tensor compared
            assert any(v.name.startswith("optim.") for v in actor.state)  # AdamW moments too
        else:  # the others: the replayed weights have the recorded digest
            assert [v.name for v in actor.state] == ["weights (sha256 digest)"]
        assert {m.name for m in actor.metrics} >= {"actor/grad_norm", "actor/pg_loss"}
        # the step's metrics, recomputed from the replayed rows, are the recorded ones
        assert {m.name for m in result.metrics} >= {"reward", "accuracy", "actor/grad_norm"}
        assert all(m.max_abs_diff == 0 for m in result.metrics)
    # not a trivial match: rewards varied and the weights moved in every step
    record = RunRecord(sync_run)
    assert sorted(record.states("actor")) == [-1, 2]  # keyframes: first and last state
    assert sorted(record.versions("actor")) == [-1, 0, 1, 2]  # every step's digest
    assert any(record.step(k).metrics["actor/grad_norm"] > 0 for k in range(3))
    before, _ = record.state("actor", -1)
    after, _ = record.state("actor", 2)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model."))


def test_states_between_keyframes_are_rebuilt_from_the_recorded_updates(sync_run):
    from asyncflow.runtime.record import layout

    record = RunRecord(sync_run)
    replayer = Replayer(sync_run)
    tensors, meta = replayer.trainer_state("actor", 1)  # keyframe -1, then steps 0 and 1
    assert meta["version"] == 2
    assert layout.weights_digest(tensors) == record.versions("actor")[1]["digest"]


def test_replay_cli_operator_and_step(sync_run, capsys):
    assert main(["replay", str(sync_run), "--operator", "rollout", "--step", "1", "--exact"]) == 0
    out = capsys.readouterr().out
    assert "step 1, rollout: 4 micro-batch(es), 32 rows" in out
    assert "response_ids: identical" in out and "inputs verified 4/4" in out
    assert "result: every replayed output is identical" in out
    assert main(["replay", str(sync_run), "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 2, actor (update)" in out and "tensors identical" in out
    assert "metrics recomputed from the replayed rows" in out


def test_replay_of_a_missing_step_or_operator_is_a_clear_error(sync_run, capsys):
    assert main(["replay", str(sync_run), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "step 7 is not in the record" in err and "steps 0-2" in err
    assert main(["replay", str(sync_run), "--step", "0", "--operator", "rewrad"]) == 2
    assert "no operator 'rewrad'" in capsys.readouterr().err


class BuggyReward(Reward):
    """A planted bug for the replay to find: every fifth sample's reward is off by 0.5."""

    def __call__(self, batch):
        out = super().__call__(batch)
        ids = batch.column("sample_id").to_numpy()
        reward = out["reward"].to_numpy(zero_copy_only=False) + 0.5 * (ids % 5 == 3)
        return {**out, "reward": pa.array(reward.astype(np.float32), pa.float32())}


def test_a_buggy_operator_swapped_in_is_caught_at_the_right_rows(sync_run):
    tok = CFG.task.tokenizer
    buggy = BuggyReward({"correct": correct_sum}, tok, extra_columns={"answer": "string"})
    replayer = Replayer(sync_run, operators={"reward": buggy}, tolerance=Tolerance.exact())
    assert any("replaying" in w and "BuggyReward" in w for w in replayer.warnings)
    report = replayer.replay_operator("reward", 1)
    assert not report.ok
    columns = {c.column: c for c in report.columns}
    assert columns["correct"].status == "identical"
    step_ids = RunRecord(sync_run).step(1).source().column("sample_id").to_pylist()
    assert columns["reward"].differing == [i for i in step_ids if i % 5 == 3]
    assert columns["reward"].max_abs_diff == pytest.approx(0.5)
    sample, recorded, replayed = columns["reward"].examples[0]
    assert sample % 5 == 3 and float(replayed) == pytest.approx(float(recorded) + 0.5)


class NoisyReward(Reward):
    """Planted nondeterminism: the reward of every seventh sample gets OS randomness; and
    the run crashes on its third step (rows of step 2), to leave a run cut short."""

    def __call__(self, batch):
        ids = batch.column("sample_id").to_numpy()
        if (ids >= 64).any():
            raise RuntimeError("planted crash in step 2")
        out = super().__call__(batch)
        noise = np.frombuffer(os.urandom(4 * len(ids)), np.uint32) / 2**32 + 0.01
        reward = out["reward"].to_numpy(zero_copy_only=False) + noise * (ids % 7 == 0)
        return {**out, "reward": pa.array(reward.astype(np.float32), pa.float32())}


def planted_recipe(cfg, run_dir):
    recipe = grpo.recipe(cfg, run_dir)
    wf = recipe.workflow
    rebuilt = type(wf)("grpo-planted")
    tok = cfg.task.tokenizer
    for node in wf.nodes:
        operator = node.operator
        if node.name == "reward":
            operator = NoisyReward(
                {"correct": correct_sum}, tok, extra_columns={"answer": "string"}
            )
        rebuilt.add(node.name, operator, replicas=node.replicas)
    for source, target in wf.weight_syncs:
        rebuilt.sync_weights(source, to=[target])
    return replace(recipe, workflow=rebuilt)


@pytest.fixture(scope="module")
def planted_run(dask_client, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("planted-run")
    cfg = replace(QUICK, steps=3)
    recipe = planted_recipe(cfg, run_dir)
    with pytest.raises(OperatorError, match="planted crash"):  # the run crashes in step 2
        SyncExecutor(recipe, dask_client, run_dir, observers=[Recorder(run_dir)]).run()
    return run_dir, recipe


def test_a_nondeterministic_operator_is_caught_with_step_and_rows(planted_run):
    run_dir, recipe = planted_run
    replayer = Replayer(run_dir, recipe=recipe, tolerance=Tolerance.exact())
    for step in (0, 1):
        report = replayer.replay_operator("reward", step)
        assert not report.ok
        ids = RunRecord(run_dir).step(step).source().column("sample_id").to_pylist()
        columns = {c.column: c for c in report.columns}
        assert columns["reward"].differing == [i for i in ids if i % 7 == 0]
        assert columns["correct"].status == "identical"
        # the other operators of the step are deterministic: they replay exactly
        assert replayer.replay_operator("rollout", step).exact
        assert replayer.replay_operator("advantage", step).exact


def test_a_crashed_run_stays_inspectable_and_replayable(planted_run, capsys):
    run_dir, recipe = planted_run
    record = RunRecord(run_dir)
    assert record.status() == "failed"
    assert record.steps() == [0, 1, 2]
    assert [record.step(k).complete for k in (0, 1, 2)] == [True, True, False]
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 finished, 1 cut short" in out and "run failed" in out
    # step 2 got as far as the rollout: that part replays exactly, the rest is noted
    result = Replayer(run_dir, recipe=recipe, tolerance=Tolerance.exact()).replay_step(2)
    replayed = {o.operator: o for o in result.operators}
    assert replayed["rollout"].exact and replayed["prompts"].exact
    assert "actor" not in replayed
    assert any("actor: nothing recorded at step 2" in note for note in result.notes)


def test_an_async_run_replays_exactly(dask_client, tmp_path):
    record_run(dask_client, tmp_path, QUICK, executor=AsyncExecutor, max_staleness=1)
    record = RunRecord(tmp_path)
    assert record.mode == "async"
    for result in Replayer(tmp_path, tolerance=Tolerance.exact()).replay_run():
        for report in result.operators:
            assert report.exact, (result.step, report.operator, report.errors, report.columns)
    # rollouts ran with whatever published version they had (bounded staleness)
    versions = {d.weight_version for d in record.step(1).dispatches("rollout")}
    assert versions <= {0, 1}


# --- generation seeding: per row, whatever the batching ---------------------------------------

SPEC = ModelSpec(ModelConfig(vocab_size=15, max_seq_len=24, d_model=32, n_layers=2))


def _rollout(replica: int, run_seed: int = 7) -> Generate:
    op = Generate(SPEC, SamplingParams(max_new_tokens=6, temperature=1.0, top_k=8))
    op.setup(
        OperatorContext("rollout", replica, 2, seed=run_seed * 1000 + replica, run_seed=run_seed)
    )
    op.set_weights(0, SPEC.build(seed=0).state_dict())
    return op


def _batch(ids, prompts):
    return pa.record_batch(
        {
            "sample_id": pa.array(ids, pa.int64()),
            "prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
        }
    )


def test_generation_tokens_depend_on_the_row_not_the_batching_or_replica():
    rng = np.random.default_rng(0)
    ids = list(range(100, 124))
    prompts = [[1, *rng.integers(3, 15, size=rng.integers(1, 6)).tolist()] for _ in ids]
    whole = _rollout(0)(_batch(ids, prompts))["response_ids"].to_pylist()
    # the same rows cut into other micro-batches, in another order, on another replica
    other = _rollout(1)
    pieces = {}
    for lo, hi in ((16, 24), (0, 5), (5, 16)):
        out = other(_batch(ids[lo:hi][::-1], prompts[lo:hi][::-1]))["response_ids"].to_pylist()
        pieces.update(zip(ids[lo:hi][::-1], out, strict=True))
    assert [pieces[i] for i in ids] == whole
    assert len({tuple(r) for r in whole}) > 1  # it does sample
    # another run seed samples other tokens
    reseeded = _rollout(0, run_seed=8)(_batch(ids, prompts))["response_ids"].to_pylist()
    assert reseeded != whole


def test_per_row_streams_sample_the_filtered_distribution():
    from asyncflow.operators.generation import _sample_inverse_cdf, row_seeds, row_uniforms

    probs = torch.tensor([[0.1, 0.4, 0.0, 0.2, 0.3]]).repeat(100_000, 1)
    u = row_uniforms(row_seeds(3, range(100_000)), 1)[:, 0]
    counts = torch.bincount(_sample_inverse_cdf(probs, u), minlength=5).double() / 100_000
    assert counts[2] == 0  # a filtered token (probability 0) is never drawn
    assert torch.allclose(counts, probs[0].double(), atol=0.005)
    # a row's stream does not depend on the other rows asked for with it
    alone = row_uniforms(row_seeds(3, [7]), 6)
    assert torch.equal(alone[0], row_uniforms(row_seeds(3, range(10)), 6)[7])
    # and the last token is reachable when u is at the top of [0, 1)
    top = torch.tensor([1.0 - 2.0**-53])
    assert _sample_inverse_cdf(torch.tensor([[0.5, 0.5, 0.0]]), top).item() == 1
