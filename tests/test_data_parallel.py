"""Data-parallel trainer ranks on a real LocalCluster: two OperatorHost actors in two worker
processes, one gloo process group, a real gradient all-reduce in `end_step`; the update
equals that of one trainer that saw every row. Also: a rank's death mid-all-reduce."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from distributed import Client, LocalCluster
from safetensors.torch import load_file

from asyncflow.errors import OperatorError
from asyncflow.operators.base import OperatorContext
from asyncflow.operators.model import ModelConfig
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.training import OptimConfig
from asyncflow.operators.update import PolicyUpdate
from asyncflow.runtime import data_parallel
from asyncflow.runtime.events import RunObserver
from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.host import OperatorHost
from asyncflow.runtime.report import read_metrics
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import grpo

CFG = ModelConfig(vocab_size=14, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
SEED = 3
I32 = pa.list_(pa.int32())
F32 = pa.list_(pa.float32())
# every extension on, so the ranks also agree on token statistics (entropy, kl, is_weight...)
OPTIONS = {
    "optim": OptimConfig(lr=1e-4, warmup_steps=2, schedule="cosine", total_steps=4),
    "entropy_coef": 0.01,
    "kl_coef": 0.1,
    "policy_loss": "decoupled_ppo",
    "token_advantages": True,
}
PROMPTS = [[1, 4, 13, 5, 12], [1, 5, 13], [1, 6, 7], [1, 9], [1, 3], [1, 4, 4], [1, 10], [1, 11]]
RESP = [[3, 4, 2], [5, 2, 3, 3, 3], [6], [7, 8, 9, 2], [3, 2], [4, 4, 2], [9, 9], [10, 11, 2]]


def trainer() -> PolicyUpdate:
    return PolicyUpdate(ModelSpec(CFG), **OPTIONS)


def rows(seed: int) -> pa.RecordBatch:
    """Eight PolicyUpdate rows of uneven response lengths."""
    rng = np.random.default_rng(seed)

    def per_token(fn):
        return pa.array([[float(x) for x in fn(len(r))] for r in RESP], F32)

    return pa.RecordBatch.from_pydict(
        {
            "sample_id": pa.array(range(seed * 100, seed * 100 + len(RESP)), pa.int64()),
            "prompt_ids": pa.array(PROMPTS, I32),
            "response_ids": pa.array(RESP, I32),
            "rollout_logprob": per_token(lambda n: -rng.uniform(0.5, 4.0, n)),
            "prox_logprob": per_token(lambda n: -rng.uniform(0.5, 4.0, n)),
            "ref_logprob": per_token(lambda n: -rng.uniform(0.5, 4.0, n)),
            "advantages": per_token(lambda n: rng.normal(size=n)),
        }
    )


def single_step(op: PolicyUpdate, batches: list[pa.RecordBatch], step: int) -> dict:
    for batch in batches:
        op(batch)
    return op.end_step(step)


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def place(client: Client, operator, rank: int, worker: str):
    ctx = OperatorContext(name="actor", replica=rank, num_replicas=2, seed=SEED)
    return client.submit(
        OperatorHost, operator, ctx, 1, actor=True, workers=[worker], pure=False
    ).result()


def join_all(actors) -> None:
    """Every rank joins at once: a rank's join returns only when all have joined."""
    address = data_parallel.free_address()
    futures = [a.join_data_parallel(address, r, len(actors)) for r, a in enumerate(actors)]
    for future in futures:
        future.result()


@pytest.fixture
def ranks(client):
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2
    actors = [place(client, trainer(), rank, worker) for rank, worker in enumerate(workers)]
    join_all(actors)
    return actors


def dp_step(actors, batches_per_rank: list[list[pa.RecordBatch]], step: int) -> list[dict]:
    """Feed each rank its micro-batches (ranks in parallel), then end_step on all at once."""

    def feed(actor, batches):
        for batch in batches:
            actor.process(batch).result()

    with ThreadPoolExecutor(len(actors)) as pool:
        list(pool.map(feed, actors, batches_per_rank))
    futures = [a.end_step(step) for a in actors]
    return [f.result() for f in futures]


def assert_ranks_match_single(actors, single: PolicyUpdate, dp_metrics, single_metrics):
    (v0, w0), (v1, w1) = (a.get_weights().result() for a in actors)
    assert v0 == v1 == single.version
    for name in w0:  # (a) the ranks' weights are bit-identical
        assert torch.equal(w0[name], w1[name]), name
    _, expected = single.get_weights()
    for name in expected:  # (b) they are the one-trainer update
        torch.testing.assert_close(w0[name], expected[name], atol=1e-6, rtol=0)
    assert dp_metrics[0] == dp_metrics[1]  # (c) global metrics, the same on every rank
    assert dp_metrics[0].keys() == single_metrics.keys()
    for key, value in single_metrics.items():
        assert dp_metrics[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


pytestmark = pytest.mark.cluster

SPLITS = {
    # rank 0: two micro-batches of 2 and 3 rows; rank 1: 3 rows (other token counts)
    "uneven": (lambda b: [[b.slice(0, 2), b.slice(2, 3)], [b.slice(5, 3)]]),
    "rank1_empty": (lambda b: [[b.slice(0, 4), b.slice(4, 4)], []]),
    "rank0_empty": (lambda b: [[], [b.slice(0, 1), b.slice(1, 7)]]),
}


@pytest.mark.parametrize("split", list(SPLITS))
def test_all_reduced_step_equals_the_single_trainer_step(ranks, split):
    batch = rows(0)
    per_rank = SPLITS[split](batch)
    single = trainer()
    single.setup(OperatorContext(name="actor", seed=SEED))
    _, initial = single.get_weights()
    for actor in ranks:  # same seed, same model: the ranks start where the single one does
        _, weights = actor.get_weights().result()
        assert all(torch.equal(weights[k], initial[k]) for k in initial)

    dp_metrics = dp_step(ranks, per_rank, 0)
    # the single trainer sees the same micro-batches, in rank order
    single_metrics = single_step(single, [b for bs in per_rank for b in bs], 0)
    assert single_metrics["actor/rows"] == 8.0
    assert_ranks_match_single(ranks, single, dp_metrics, single_metrics)


def test_consecutive_steps_stay_equal_to_the_single_trainer(ranks):
    single = trainer()
    single.setup(OperatorContext(name="actor", seed=SEED))
    plan = [
        (0, lambda b: [[b.slice(0, 3)], [b.slice(3, 2), b.slice(5, 3)]]),
        (1, lambda b: [[b.slice(0, 1)], [b.slice(1, 7)]]),
        (2, lambda b: [[], []]),  # no rows anywhere: no step on any rank
        (2, lambda b: [[b.slice(0, 8)], []]),
    ]
    for step, split in plan:
        per_rank = split(rows(step))
        dp_metrics = dp_step(ranks, per_rank, step)
        single_metrics = single_step(single, [b for bs in per_rank for b in bs], step)
        assert_ranks_match_single(ranks, single, dp_metrics, single_metrics)
    assert single.version == 3


def test_discard_step_drops_the_half_accumulated_step(ranks):
    batch = rows(0)
    single = trainer()
    single.setup(OperatorContext(name="actor", seed=SEED))
    ranks[0].process(batch.slice(0, 4)).result()  # a step that will be redone
    for actor in ranks:
        actor.discard_step().result()
    per_rank = [[batch.slice(0, 4)], [batch.slice(4, 4)]]
    dp_metrics = dp_step(ranks, per_rank, 0)
    single_metrics = single_step(single, [batch], 0)
    assert_ranks_match_single(ranks, single, dp_metrics, single_metrics)


def test_replicas_without_a_process_group_refuse_to_step_alone():
    op = trainer()
    op.setup(OperatorContext(name="actor", replica=1, num_replicas=2, seed=SEED))
    op(rows(0))
    with pytest.raises(OperatorError, match="2 data-parallel ranks, but its process group"):
        op.end_step(0)


def test_data_parallel_helpers_outside_a_group():
    assert data_parallel.world_size() == 1 and data_parallel.rank() == 0
    data_parallel.leave()  # no group: nothing to do
    address = data_parallel.free_address()
    assert address.startswith("tcp://127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        data_parallel.join(address, 2, 2)


def test_a_rank_killed_mid_all_reduce_fails_the_survivor_fast_and_it_regroups(client, ranks):
    """The survivor's collective fails as soon as the peer's process dies (its TCP
    connection closes), not at the group timeout; it then joins a new group with a
    replacement rank, and the redone step is again the single-trainer step."""
    batch = rows(0)
    survivor, victim = ranks
    survivor.process(batch.slice(0, 5)).result()
    victim.process(batch.slice(5, 3)).result()
    pending = survivor.end_step(0)  # blocks in the all-reduce: the victim never joins it
    time.sleep(1.0)
    pids = client.run(os.getpid)
    victim_worker = sorted(pids)[1]
    t0 = time.perf_counter()
    os.kill(pids[victim_worker], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        pending.result(timeout=20)
    assert time.perf_counter() - t0 < 10  # seconds, against a 60 s group timeout

    # recovery: the nanny restarts the worker; a fresh rank there, a new group
    survivor.discard_step().result()
    client.wait_for_workers(2, timeout=30)
    new_worker = next(w for w in client.scheduler_info()["workers"] if w != sorted(pids)[0])
    _, weights = survivor.get_weights().result()
    replacement = place(client, trainer(), 1, new_worker)
    replacement.set_weights(0, weights).result()
    join_all([survivor, replacement])

    single = trainer()
    single.setup(OperatorContext(name="actor", seed=SEED))
    per_rank = [[batch.slice(0, 5)], [batch.slice(5, 3)]]
    dp_metrics = dp_step([survivor, replacement], per_rank, 0)
    single_metrics = single_step(single, [b for bs in per_rank for b in bs], 0)
    assert_ranks_match_single([survivor, replacement], single, dp_metrics, single_metrics)


# -- through the executors: a workflow whose actor has two data-parallel ranks --------------


class ActorDispatches(RunObserver):
    def __init__(self):
        self.replicas: list[int] = []

    def dispatched(self, d):
        if d.operator == "actor":
            self.replicas.append(d.replica)


DP_RUN = grpo.GRPOConfig(
    steps=3, prompts_per_step=8, group_size=4, micro_batch_size=8, warmstart_steps=20
)


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final.safetensors"))


def test_sync_run_with_two_actor_ranks_takes_the_single_trainer_update(dask_client, tmp_path):
    """Step 0's rows are sampled from the same start weights either way, so its update
    (and so the weights after one step) must match a single actor's to float rounding."""
    one = replace(DP_RUN, steps=1)
    SyncExecutor(grpo.recipe(one, tmp_path / "one"), dask_client, tmp_path / "one").run()
    seen = ActorDispatches()
    two = replace(one, actor_replicas=2)
    result = SyncExecutor(
        grpo.recipe(two, tmp_path / "two"), dask_client, tmp_path / "two", observers=[seen]
    ).run()

    assert sorted(set(seen.replicas)) == [0, 1], "both ranks should get micro-batches"
    assert sorted(result.trained["actor"][0]) == list(range(32))
    expected, got = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    assert read_metrics(tmp_path / "two")[0]["actor/rows"] == 32.0  # global, not per rank


def test_async_run_with_two_actor_ranks_trains_every_sample_once(dask_client, tmp_path):
    seen = ActorDispatches()
    cfg = replace(DP_RUN, actor_replicas=2)
    result = AsyncExecutor(
        grpo.recipe(cfg, tmp_path), dask_client, tmp_path, max_staleness=1, observers=[seen]
    ).run()

    assert sorted(set(seen.replicas)) == [0, 1]
    trained = [i for step in range(cfg.steps) for i in result.trained["actor"][step]]
    assert sorted(trained) == list(range(cfg.steps * 32))  # none lost, none twice
    metrics = read_metrics(tmp_path)
    assert [m["actor/rows"] for m in metrics] == [32.0] * cfg.steps
    assert all(m["staleness/max"] <= 1 for m in metrics)
