"""The distributed TransferQueue on a real LocalCluster: metadata on the scheduler, data on
the workers that produced it, leases redelivered when their holder dies or expires."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pytest
from distributed import Client, LocalCluster

from asyncflow.errors import QueueError
from asyncflow.runtime.queue.extension import EXTENSION
from asyncflow.runtime.queue.remote import DistributedTransferQueue
from asyncflow.runtime.queue.transfer_queue import QueueFull

pytestmark = pytest.mark.cluster

TOKENS = pa.list_(pa.int32())


def prompts(n: int, start: int = 0) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "prompt_ids": pa.array([[start + i] * (1 + i % 3) for i in range(n)], TOKENS),
            "group_id": pa.array((np.arange(n) + start) // 4, pa.int64()),
        }
    )


def produce(queue: DistributedTransferQueue, partition: int, n: int) -> list[int]:
    return queue.add_rows(partition, prompts(n)).tolist()


def take(queue, task, partition, batch_size, timeout=10.0, ack=True):
    lease = queue.get(task, ["prompt_ids"], partition, batch_size=batch_size, timeout=timeout)
    if lease is None:
        return None
    if ack:
        queue.ack(lease)
    return lease.sample_ids.tolist(), lease.batch.column("prompt_ids").to_pylist()


def respond(queue, partition):
    lease = queue.get("rollout", ["prompt_ids"], partition, batch_size=64, timeout=10)
    lengths = [len(p) for p in lease.batch.column("prompt_ids").to_pylist()]
    out = pa.record_batch({"response_ids": pa.array([[7] * n for n in lengths], TOKENS)})
    queue.put(partition, lease.sample_ids, out, producer="rollout")
    queue.ack(lease)
    return lease.sample_ids.tolist()


@pytest.fixture(scope="module")
def cluster():
    with (
        LocalCluster(
            n_workers=3, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield cluster, client


def workers(client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def test_rows_flow_between_worker_processes(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    a, b, _c = workers(client)
    # the consumer asks first and waits (event-driven) until the producer commits
    waiting = client.submit(respond, queue, 0, workers=[b], pure=False)
    time.sleep(0.3)
    ids = client.submit(produce, queue, 0, 12, workers=[a], pure=False).result()
    assert sorted(waiting.result()) == ids
    table = queue.gather(0, ["prompt_ids", "response_ids"])
    assert table.column("sample_id").to_pylist() == ids
    assert table.column("prompt_ids").to_pylist() == prompts(12).column("prompt_ids").to_pylist()
    lengths = [len(p) for p in table.column("prompt_ids").to_pylist()]
    assert [len(r) for r in table.column("response_ids").to_pylist()] == lengths
    # data lives where it was produced: nothing but metadata on the scheduler
    stats = queue.stats()
    assert stats["chunks"] == 2 and stats["rows"] == 12
    queue.close()


def test_client_side_puts_and_ragged_round_trip(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    batch = prompts(10)
    ids = queue.add_rows(3, batch)
    got = queue.gather(3, ["prompt_ids", "group_id"], sample_ids=ids[::-1])
    assert got.column("sample_id").to_pylist() == ids[::-1].tolist()
    assert got.column("prompt_ids").to_pylist() == batch.column("prompt_ids").to_pylist()[::-1]
    queue.clear(3)
    with pytest.raises(QueueError, match="unknown partition 3"):
        queue.gather(3, ["prompt_ids"])
    queue.close()


def test_bad_put_is_rejected_and_leaves_nothing_behind(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    ids = queue.add_rows(0, prompts(4))
    bad = pa.record_batch({"response_ids": pa.array([[1]] * 2, TOKENS)})
    with pytest.raises(QueueError, match=r"sample ids \[100, 101\] do not exist"):
        queue.put(0, [100, 101], bad)
    with pytest.raises(QueueError, match="'prompt_ids' is already stored"):
        queue.put(0, ids[:4], pa.record_batch({"prompt_ids": prompts(4).column("prompt_ids")}))
    stats = queue.stats()
    assert stats["chunks"] == 1  # the rejected chunks were dropped again
    assert queue.gather(0, ["prompt_ids"]).num_rows == 4
    queue.close()


def test_each_task_sees_each_row_once_across_concurrent_consumers(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    ids = queue.add_rows(0, prompts(60))
    futures = [
        client.submit(_drain, queue, "actor", 0, 7, workers=[w], pure=False)
        for w in workers(client)
    ]
    seen = [i for f in futures for i in f.result()]
    assert sorted(seen) == ids.tolist()  # none lost, none duplicated
    queue.close()


def _drain(queue, task, partition, batch_size):
    seen = []
    while (got := take(queue, task, partition, batch_size, timeout=0.5)) is not None:
        seen.extend(got[0])
    return seen


def test_a_killed_consumer_gets_its_lease_redelivered(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    a, b, c = workers(client)
    ids = client.submit(produce, queue, 0, 8, workers=[a], pure=False).result()
    leased = client.submit(take, queue, "actor", 0, 8, ack=False, workers=[b], pure=False)
    assert sorted(leased.result()[0]) == ids
    assert queue.get("actor", ["prompt_ids"], 0) is None  # leased, not available

    # the consumer's process dies holding the lease
    client.run(os._exit, 1, workers=[b], on_error="ignore")
    redelivered = client.submit(take, queue, "actor", 0, 8, 30.0, workers=[c], pure=False)
    assert sorted(redelivered.result()[0]) == ids
    assert queue.get("actor", ["prompt_ids"], 0) is None  # acked exactly once: nothing left
    queue.close()


def test_rows_whose_data_died_are_reported_lost_not_handed_out(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    holder = workers(client)[0]
    ids = client.submit(produce, queue, 0, 5, workers=[holder], pure=False).result()
    client.run(os._exit, 1, workers=[holder], on_error="ignore")
    deadline = time.monotonic() + 30
    while len(queue.lost(0)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(queue.lost(0).tolist()) == ids
    assert queue.get("actor", ["prompt_ids"], 0) is None
    client.wait_for_workers(3, timeout=60)
    queue.close()


def test_expired_lease_is_redelivered_and_late_ack_fails(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    ids = queue.add_rows(0, prompts(4))
    first = queue.get("actor", ["prompt_ids"], 0, lease_timeout=0.2)
    again = queue.get("actor", ["prompt_ids"], 0, timeout=10)  # wakes when the lease expires
    assert again is not None and again.sample_ids.tolist() == ids.tolist()
    with pytest.raises(QueueError, match=f"lease {first.lease_id}"):
        queue.ack(first)
    queue.ack(again)
    queue.close()


def test_waiting_consumer_times_out_with_none(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    queue.add_rows(0, prompts(2))
    start = time.monotonic()
    assert queue.get("actor", ["response_ids"], 0, timeout=0.3) is None
    assert time.monotonic() - start >= 0.3
    queue.close()


def test_extension_is_installed_once(cluster):
    _, client = cluster
    DistributedTransferQueue(client=client).close()
    DistributedTransferQueue(client=client).close()
    assert client.run_on_scheduler(lambda dask_scheduler: EXTENSION in dask_scheduler.extensions)


def test_async_call_style_on_an_asynchronous_client(cluster):
    import asyncio

    local, _ = cluster

    async def main():
        async with Client(local.scheduler_address, asynchronous=True) as client:
            queue = await DistributedTransferQueue(client=client)
            ids = await queue.add_rows(0, prompts(3))
            lease = await queue.get("actor", ["prompt_ids"], 0, timeout=5)
            await queue.ack(lease)
            stats = await queue.stats()
            await queue.close()
            return ids.tolist(), lease.sample_ids.tolist(), stats["leases_in_flight"]

    ids, leased, in_flight = asyncio.run(main())
    assert ids == leased == [*range(ids[0], ids[0] + 3)] and in_flight == 0


def test_staleness_filter_and_policy_versions(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    versions = pa.array([0, 1, 2, 3], pa.int64())
    batch = prompts(4).append_column("policy_version", versions)
    ids = queue.add_rows(0, batch)
    queue.set_policy_version(3)
    lease = queue.get("actor", ["prompt_ids"], 0, max_staleness=1)
    assert lease.sample_ids.tolist() == ids[2:].tolist()  # versions 2 and 3 only
    assert sorted(queue.stale(0, 1).tolist()) == ids[:2].tolist()
    with pytest.raises(QueueError):
        queue.set_policy_version(2)  # versions never go back
    queue.close()


def test_group_leases_are_token_balanced_and_keep_groups_whole(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    lengths = [1, 9, 2, 8, 3, 7, 4, 6]  # group g = rows 2g, 2g+1: 10 tokens per group
    batch = pa.record_batch(
        {
            "prompt_ids": pa.array([[0] * n for n in lengths], TOKENS),
            "group_id": pa.array([0, 0, 1, 1, 2, 2, 3, 3], pa.int64()),
        }
    )
    queue.add_rows(0, batch)
    leases = queue.get_group(
        "actor", ["prompt_ids", "group_id"], 0, ranks=2, sampler="group_preserving"
    )
    assert len(leases) == 2
    tokens = [sum(map(len, lease.batch.column("prompt_ids").to_pylist())) for lease in leases]
    assert tokens == [20, 20]
    for lease in leases:
        groups = lease.batch.column("group_id").to_pylist()
        assert all(groups.count(g) == 2 for g in groups)  # no group split across ranks
    same = queue.get_group("ref", ["prompt_ids"], 0, ranks=3, same_view=True, batch_size=4)
    assert [lease.sample_ids.tolist() for lease in same] == [same[0].sample_ids.tolist()] * 3
    queue.close()


def test_capacity_backpressure_and_eviction_free_the_workers(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client, capacity_rows=8, consumers=["actor"])
    holder = workers(client)[0]
    client.submit(produce, queue, 0, 8, workers=[holder], pure=False).result()
    with pytest.raises(QueueFull):
        queue.add_rows(0, prompts(4), timeout=0.2)  # full: the producer is pushed back
    blocked = client.submit(produce, queue, 0, 4, workers=[holder], pure=False)
    time.sleep(0.3)
    assert not blocked.done()
    lease = queue.get("actor", ["prompt_ids"], 0, batch_size=8)
    queue.ack(lease)  # every declared consumer acked: rows evicted, room made
    assert len(blocked.result(timeout=10)) == 4
    stats = queue.stats()
    assert stats["live_rows"] == 4 and stats["evicted_rows"] == 8
    deadline = time.monotonic() + 10  # the holder is told to drop the evicted chunk
    while client.run(_chunks_held, workers=[holder])[holder] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.run(_chunks_held, workers=[holder])[holder] == 1
    queue.close()


def _chunks_held() -> int:
    from asyncflow.runtime.queue.chunk_store import STORE

    return len(STORE)


def test_sealed_partition_hands_out_the_remainder_and_drains(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    ids = queue.add_rows(0, prompts(5))
    assert queue.get("actor", ["prompt_ids"], 0, min_rows=8) is None  # waits for 8 rows
    queue.seal(0)
    lease = queue.get("actor", ["prompt_ids"], 0, min_rows=8, timeout=5)
    assert lease.sample_ids.tolist() == ids.tolist()
    queue.ack(lease)
    assert queue.is_drained("actor", ["prompt_ids"], 0)
    assert queue.get("actor", ["prompt_ids"], 0, timeout=None) is None  # never hangs
    queue.close()


def test_token_budget_sampler(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    queue.add_rows(0, prompts(6))  # token lengths 1, 2, 3, 1, 2, 3
    lease = queue.get("actor", ["prompt_ids"], 0, sampler="token_budget", max_tokens=4)
    assert sum(map(len, lease.batch.column("prompt_ids").to_pylist())) <= 4
    assert len(lease) == 2
    with pytest.raises(QueueError, match="unknown sampler"):
        queue.get("actor", ["prompt_ids"], 0, sampler="random")
    queue.close()


def test_unawaited_acks_ride_with_the_next_get_and_keep_exactly_once(cluster):
    _, client = cluster
    queue = DistributedTransferQueue(client=client)
    ids = queue.add_rows(0, prompts(20))
    seen = []
    while (lease := queue.get("actor", ["prompt_ids"], 0, batch_size=3)) is not None:
        seen.extend(lease.sample_ids.tolist())
        queue.ack(lease, wait=False)  # returns at once; sent with the next get
    assert sorted(seen) == ids.tolist()  # each row once: the next get saw the previous ack
    deadline = time.monotonic() + 5
    while queue.stats()["leases_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the last ack goes alone after a few ms
    assert queue.stats()["leases_in_flight"] == 0
    queue.close()
