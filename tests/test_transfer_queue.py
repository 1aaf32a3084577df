"""TransferQueue: lifecycle, per-task consumption, leases (owners, deadlines), waiting,
sealing, staleness, capacity, eviction, groups of ranks, bad input, concurrency."""

from __future__ import annotations

import pickle
import random
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from asyncflow.errors import QueueError
from asyncflow.runtime.queue import Lease, QueueFull, TransferQueue, samplers
from asyncflow.runtime.queue.samplers import Candidates

TOKENS = pa.list_(pa.int32())


def prompts_batch(prompts: list[list[int]], groups: list[int] | None = None) -> pa.RecordBatch:
    columns = {"prompt_ids": pa.array(prompts, TOKENS)}
    if groups is not None:
        columns["group_id"] = pa.array(groups, pa.int64())
    return pa.record_batch(columns)


def rewards(values: list[float]) -> pa.RecordBatch:
    return pa.record_batch({"reward": pa.array(values, pa.float32())})


def snapshot(tq: TransferQueue, partition: object) -> dict:
    """Everything observable about a partition, to prove a rejected call changed nothing."""
    schema = tq.schema(partition)
    state: dict = {"schema": schema, "rows": tq.num_rows(partition), "stats": tq.stats()}
    for name in schema.names:
        ids = tq.ready(partition, [name])
        state[name] = tq.gather(partition, [name], ids).to_pydict()
    return state


@pytest.fixture
def tq() -> TransferQueue:
    """Partition 'p': rows 0-3 in groups 10 and 11; `reward` stored for rows 0 and 1."""
    queue = TransferQueue()
    ids = queue.add_rows("p", prompts_batch([[1, 2], [3], [4, 5, 6], []], [10, 10, 11, 11]))
    assert ids.tolist() == [0, 1, 2, 3]
    queue.put("p", [0, 1], rewards([0.5, 1.5]), producer="reward_fn")
    return queue


# ---- lifecycle ---------------------------------------------------------------------------


def test_add_put_get_ack_lifecycle() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("train", prompts_batch([[1], [2, 3], [4, 5, 6]]))
    assert ids.dtype == np.int64 and ids.tolist() == [0, 1, 2]
    assert tq.get("rollout", ["prompt_ids", "response_ids"], "train") is None

    lease = tq.get("rollout", ["prompt_ids"], "train", batch_size=2)
    assert isinstance(lease, Lease) and lease.task == "rollout" and lease.partition == "train"
    assert lease.sample_ids.tolist() == [0, 1]
    assert lease.batch.schema.names == ["sample_id", "prompt_ids"]
    assert lease.batch.column("prompt_ids").to_pylist() == [[1], [2, 3]]
    responses = pa.record_batch({"response_ids": pa.array([[7], [8, 9]], TOKENS)})
    tq.put("train", lease.sample_ids, responses, producer="rollout")
    tq.ack(lease)

    assert tq.pending("rollout", ["prompt_ids"], "train") == 1
    assert tq.ready("train", ["response_ids"]).tolist() == [0, 1]
    trainer = tq.get("trainer", ["response_ids", "prompt_ids"], "train")
    assert trainer.batch.schema.names == ["sample_id", "response_ids", "prompt_ids"]
    assert trainer.batch.to_pydict() == {
        "sample_id": [0, 1],
        "response_ids": [[7], [8, 9]],
        "prompt_ids": [[1], [2, 3]],
    }
    tq.ack(trainer.lease_id)
    assert tq.get("trainer", ["response_ids"], "train") is None


def test_sample_ids_are_unique_and_increasing_across_partitions() -> None:
    tq = TransferQueue()
    a = tq.add_rows("a", prompts_batch([[1], [2]]))
    b = tq.add_rows("b", prompts_batch([[3]]))
    c = tq.add_rows("a", prompts_batch([[4], [5]]))
    assert a.tolist() == [0, 1] and b.tolist() == [2] and c.tolist() == [3, 4]
    assert tq.partitions() == ["a", "b"]
    assert tq.num_rows("a") == 4 and tq.num_rows("b") == 1
    assert tq.gather("a", ["prompt_ids"]).column("sample_id").to_pylist() == [0, 1, 3, 4]


def test_each_task_sees_each_row_exactly_once() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([[i] for i in range(10)]))
    seen: dict[str, list[int]] = {"reward": [], "logger": []}
    for task in ("reward", "logger", "reward", "logger", "reward", "logger", "reward", "logger"):
        lease = tq.get(task, ["prompt_ids"], "p", batch_size=3)
        if lease is not None:
            seen[task] += lease.sample_ids.tolist()
            tq.ack(lease)
    assert seen["reward"] == ids.tolist()
    assert seen["logger"] == ids.tolist()


def test_row_missing_a_column_is_not_handed_out(tq: TransferQueue) -> None:
    lease = tq.get("trainer", ["prompt_ids", "reward"], "p")
    assert lease.sample_ids.tolist() == [0, 1]
    assert tq.pending("trainer", ["prompt_ids", "reward"], "p") == 0
    tq.put("p", [3], rewards([3.0]))
    again = tq.get("trainer", ["prompt_ids", "reward"], "p")
    assert again.sample_ids.tolist() == [3]


def test_get_of_a_never_written_column_is_just_not_ready(tq: TransferQueue) -> None:
    assert tq.get("t", ["advantage"], "p") is None
    assert tq.pending("t", ["advantage"], "p") == 0
    assert tq.ready("p", ["advantage"]).tolist() == []


def test_released_rows_are_redelivered_and_acked_rows_never(tq: TransferQueue) -> None:
    first = tq.get("t", ["prompt_ids"], "p", batch_size=2)
    second = tq.get("t", ["prompt_ids"], "p", batch_size=2)
    assert first.sample_ids.tolist() == [0, 1] and second.sample_ids.tolist() == [2, 3]
    assert tq.get("t", ["prompt_ids"], "p") is None  # all leased
    tq.release(first)
    tq.ack(second)
    redelivered = tq.get("t", ["prompt_ids"], "p")
    assert redelivered.sample_ids.tolist() == [0, 1]
    assert redelivered.lease_id != first.lease_id
    tq.ack(redelivered)
    assert tq.get("t", ["prompt_ids"], "p") is None
    assert tq.stats()["leases_in_flight"] == 0


def test_columns_come_back_in_the_order_asked_and_sample_id_is_not_duplicated(
    tq: TransferQueue,
) -> None:
    lease = tq.get("t", ["reward", "sample_id", "group_id"], "p")
    assert lease.batch.schema.names == ["sample_id", "reward", "group_id"]
    assert lease.batch.schema.field("sample_id").type == pa.int64()


def test_table_input_is_accepted() -> None:
    tq = TransferQueue()
    table = pa.Table.from_batches([prompts_batch([[1]]), prompts_batch([[2, 3]])])
    assert table.column("prompt_ids").num_chunks == 2
    ids = tq.add_rows("p", table)
    tq.put("p", ids, pa.Table.from_batches([rewards([1.0]), rewards([2.0])]))
    assert tq.gather("p", ["prompt_ids", "reward"]).to_pydict() == {
        "sample_id": [0, 1],
        "prompt_ids": [[1], [2, 3]],
        "reward": [1.0, 2.0],
    }


def test_put_accepts_an_echoed_sample_id_column(tq: TransferQueue) -> None:
    batch = pa.record_batch(
        {"sample_id": pa.array([3, 2], pa.int64()), "reward": pa.array([3.0, 2.0], pa.float32())}
    )
    tq.put("p", [3, 2], batch)
    assert tq.gather("p", ["reward"]).column("reward").to_pylist() == [0.5, 1.5, 2.0, 3.0]
    assert "sample_id" not in tq.schema("p").names


def test_clear_drops_the_partition_and_invalidates_its_leases(tq: TransferQueue) -> None:
    tq.add_rows("other", prompts_batch([[9]]))
    lease = tq.get("t", ["prompt_ids"], "p")
    other = tq.get("t", ["prompt_ids"], "other")
    tq.clear("p")
    assert tq.partitions() == ["other"]
    with pytest.raises(QueueError, match=r"lease \d+: its partition 'p' was cleared"):
        tq.ack(lease)
    with pytest.raises(QueueError, match="unknown partition 'p'"):
        tq.gather("p", ["prompt_ids"])
    tq.ack(other)  # other partitions are untouched
    assert tq.stats()["partitions"].keys() == {"other"}


def test_stats_are_counters(tq: TransferQueue) -> None:
    lease = tq.get("t", ["reward"], "p")
    stats = tq.stats()
    assert stats["rows"] == 4
    assert stats["leases_in_flight"] == 1
    part = stats["partitions"]["p"]
    assert part["ready"] == {"prompt_ids": 4, "group_id": 4, "reward": 2}
    assert part["leases_in_flight"] == 1
    assert part["bytes"] > 0 and stats["bytes"] == part["bytes"]
    tq.ack(lease)
    assert tq.stats()["leases_in_flight"] == 0


def test_empty_add_rows_returns_no_ids_and_declares_the_partition() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([]))
    assert ids.dtype == np.int64 and len(ids) == 0
    assert tq.partitions() == ["p"] and tq.num_rows("p") == 0
    assert tq.schema("p").field("prompt_ids").type == TOKENS
    assert tq.get("t", ["prompt_ids"], "p") is None
    assert tq.gather("p", ["prompt_ids"]).num_rows == 0


# ---- data layout -------------------------------------------------------------------------


def test_ragged_list_columns_round_trip_exactly() -> None:
    rng = random.Random(0)
    tq = TransferQueue()
    prompts = [
        [rng.randrange(-(2**31), 2**31) for _ in range(rng.randrange(0, 9))] for _ in range(60)
    ]
    prompts[5] = None  # nulls survive too
    ids = tq.add_rows("p", pa.record_batch({"prompt_ids": pa.array(prompts, TOKENS)}))
    responses = {
        int(i): [rng.randrange(0, 50_000) for _ in range(rng.randrange(0, 40))] for i in ids
    }
    shuffled = ids.tolist()
    rng.shuffle(shuffled)
    for start in range(0, 60, 7):  # written in scrambled micro-batches
        part = shuffled[start : start + 7]
        column = pa.array([responses[i] for i in part], TOKENS)
        tq.put("p", part, pa.record_batch({"response_ids": column}))

    table = tq.gather("p", ["prompt_ids", "response_ids"])
    assert table.column("prompt_ids").to_pylist() == prompts
    assert table.column("response_ids").to_pylist() == [responses[i] for i in ids.tolist()]
    assert table.schema.field("response_ids").type == TOKENS

    lease = tq.get("t", ["response_ids"], "p", batch_size=25)
    assert lease.batch.column("response_ids").to_pylist() == [
        responses[i] for i in lease.sample_ids.tolist()
    ]


def test_gather_ordering(tq: TransferQueue) -> None:
    tq.put("p", [3, 2], rewards([3.0, 2.0]))
    everything = tq.gather("p", ["reward", "prompt_ids"])
    assert everything.schema.names == ["sample_id", "reward", "prompt_ids"]
    assert everything.column("sample_id").to_pylist() == [0, 1, 2, 3]
    assert everything.column("reward").to_pylist() == [0.5, 1.5, 2.0, 3.0]
    picked = tq.gather("p", ["reward"], [3, 0, 2])
    assert picked.to_pydict() == {"sample_id": [3, 0, 2], "reward": [3.0, 0.5, 2.0]}
    # gather does not consume
    assert tq.pending("t", ["reward"], "p") == 4


def test_scattered_reads_match_contiguous_reads() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", pa.record_batch({"x": pa.array(np.arange(400) * 3)}))
    order = np.random.default_rng(1).permutation(ids)
    for start in range(0, 400, 50):
        part = order[start : start + 50]
        tq.put("p", part, pa.record_batch({"y": pa.array(part * 7)}))
    wanted = np.random.default_rng(2).permutation(ids)[:300]  # many tiny runs -> take path
    table = tq.gather("p", ["x", "y"], wanted)
    assert table.column("x").to_pylist() == (wanted * 3).tolist()
    assert table.column("y").to_pylist() == (wanted * 7).tolist()


def test_reading_what_was_written_is_zero_copy() -> None:
    tq = TransferQueue()
    column = pa.array(np.arange(100, dtype=np.int64))
    tq.add_rows("p", pa.record_batch({"x": column}))
    lease = tq.get("t", ["x"], "p", batch_size=40)
    got = lease.batch.column("x")
    assert got.buffers()[1].address == column.buffers()[1].address
    assert got.to_pylist() == list(range(40))


def test_lengths_and_policy_versions_reach_the_sampler() -> None:
    tq = TransferQueue()
    batch = pa.record_batch(
        {
            "prompt_ids": pa.array([[1, 2], [3]], TOKENS),
            "policy_version": pa.array([4, None], pa.int64()),
        }
    )
    ids = tq.add_rows("p", batch)
    tq.put("p", ids, pa.record_batch({"response_ids": pa.array([[5, 6, 7], []], TOKENS)}))
    seen: list[Candidates] = []

    def spy(candidates: Candidates, batch_size: int | None) -> np.ndarray:
        seen.append(candidates)
        return samplers.sequential(candidates, batch_size)

    tq.get("t", ["prompt_ids"], "p", sampler=spy)
    assert seen[0].lengths.tolist() == [5, 1]
    assert seen[0].policy_versions.tolist() == [4, -1]
    assert seen[0].grouped.tolist() == [False, False]


def test_a_sampler_picking_rows_not_offered_is_rejected(tq: TransferQueue) -> None:
    def rogue(candidates: Candidates, batch_size: int | None) -> np.ndarray:
        return np.array([0, 99])

    with pytest.raises(QueueError, match=r"sampler rogue picked rows not offered: \[99\]"):
        tq.get("t", ["prompt_ids"], "p", sampler=rogue)
    assert tq.pending("t", ["prompt_ids"], "p") == 4  # nothing leased


# ---- samplers (pure) ---------------------------------------------------------------------


def test_sequential_respects_batch_size() -> None:
    cands = Candidates.build([3, 5, 8, 9])
    assert samplers.sequential(cands, 2).tolist() == [3, 5]
    assert samplers.sequential(cands, 10).tolist() == [3, 5, 8, 9]
    assert samplers.sequential(cands, None).tolist() == [3, 5, 8, 9]
    assert samplers.sequential(Candidates.build([]), 4).tolist() == []


def test_sequential_respects_batch_size_through_the_queue() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[i] for i in range(7)]))
    sizes = []
    for _ in range(10):  # bounded: a queue that never drains must fail, not hang
        lease = tq.get("t", ["prompt_ids"], "p", batch_size=3)
        if lease is None:
            break
        sizes.append(len(lease))
        tq.ack(lease)
    assert sizes == [3, 3, 1]


def test_group_preserving_rounds_down_to_whole_groups() -> None:
    cands = Candidates.build(range(9), group_ids=[1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert samplers.group_preserving(cands, 7).tolist() == [0, 1, 2, 3, 4, 5]
    assert samplers.group_preserving(cands, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert samplers.group_preserving(cands, None).tolist() == list(range(9))


def test_group_preserving_always_gives_one_whole_group() -> None:
    cands = Candidates.build(range(4), group_ids=[7, 7, 7, 7])
    assert samplers.group_preserving(cands, 2).tolist() == [0, 1, 2, 3]


def test_group_preserving_skips_incomplete_groups_and_keeps_singletons() -> None:
    cands = Candidates.build(
        [0, 1, 4, 5, 6], group_ids=[1, 1, 2, None, 2], group_sizes=[3, 3, 2, 1, 2]
    )
    # group 1 has 2 of 3 rows ready; row 5 is ungrouped; group 2 (rows 4, 6) is complete
    assert samplers.group_preserving(cands, None).tolist() == [4, 5, 6]
    assert samplers.group_preserving(cands, 2).tolist() == [4, 6]
    incomplete = Candidates.build([0, 1], group_ids=[1, 1], group_sizes=[3, 3])
    assert samplers.group_preserving(incomplete, 10).tolist() == []


@settings(max_examples=100, deadline=None)
@given(
    groups=st.lists(st.integers(0, 6), max_size=30),
    missing=st.lists(st.integers(0, 6), max_size=3),
    batch_size=st.none() | st.integers(1, 12),
)
def test_group_preserving_never_splits_a_group(groups, missing, batch_size) -> None:
    sizes = [groups.count(g) + missing.count(g) for g in groups]
    cands = Candidates.build(range(len(groups)), group_ids=groups, group_sizes=sizes)
    chosen = samplers.group_preserving(cands, batch_size).tolist()
    picked_groups = {groups[i] for i in chosen}
    assert not picked_groups & set(missing)  # incomplete groups never go out
    for g in picked_groups:  # whole groups only
        assert sorted(i for i, x in enumerate(groups) if x == g) == sorted(
            i for i in chosen if groups[i] == g
        )
    complete = [g for g in dict.fromkeys(groups) if g not in missing]
    if complete:
        assert chosen, "a complete group exists, so at least one goes out"
        if batch_size is not None and len(picked_groups) > 1:
            assert len(chosen) <= batch_size
    else:
        assert chosen == []


def test_group_preserving_through_the_queue_waits_for_the_whole_group() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([[1]] * 6, [0, 0, 0, 1, 1, 1]))
    tq.put("p", ids[[0, 1, 3, 4, 5]], rewards([1.0] * 5))  # group 0 misses row 2
    use = {"sampler": samplers.group_preserving, "batch_size": 4}
    lease = tq.get("t", ["reward"], "p", **use)
    assert lease.sample_ids.tolist() == [3, 4, 5]
    assert tq.get("t", ["reward"], "p", **use) is None  # group 0 still incomplete
    tq.put("p", [2], rewards([2.0]))
    assert tq.get("t", ["reward"], "p", **use).sample_ids.tolist() == [0, 1, 2]


def test_group_preserving_redelivers_whole_groups() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[1]] * 4, [5, 5, 6, 6]))
    use = {"sampler": samplers.group_preserving, "batch_size": 2}
    first = tq.get("t", ["prompt_ids"], "p", **use)
    second = tq.get("t", ["prompt_ids"], "p", **use)
    tq.release(first)
    tq.ack(second)
    assert tq.get("t", ["prompt_ids"], "p", **use).sample_ids.tolist() == [0, 1]


# ---- bad input: clear error, nothing changed ---------------------------------------------


def rejected(tq: TransferQueue, call, *patterns: str) -> None:
    """`call` raises a QueueError whose message matches every pattern; 'p' is unchanged."""
    before = snapshot(tq, "p")
    with pytest.raises(QueueError) as info:
        call()
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    assert snapshot(tq, "p") == before


def test_unknown_partition(tq: TransferQueue) -> None:
    for call in (
        lambda: tq.put("nope", [0], rewards([1.0])),
        lambda: tq.get("t", ["reward"], "nope"),
        lambda: tq.gather("nope", ["reward"]),
        lambda: tq.ready("nope", ["reward"]),
        lambda: tq.pending("t", ["reward"], "nope"),
        lambda: tq.num_rows("nope"),
        lambda: tq.schema("nope"),
        lambda: tq.clear("nope"),
    ):
        rejected(tq, call, "unknown partition 'nope'", "'p'")


def test_put_to_missing_sample_ids(tq: TransferQueue) -> None:
    many = list(range(100, 120))
    rejected(
        tq,
        lambda: tq.put("p", [2, *many], rewards([1.0] * 21)),
        "sample ids [100, 101, 102",
        "(+12 more)",
        "do not exist",
        "'p'",
    )


def test_put_to_rows_of_another_partition(tq: TransferQueue) -> None:
    other = tq.add_rows("q", prompts_batch([[1]]))
    rejected(tq, lambda: tq.put("p", other, rewards([1.0])), f"sample ids [{other[0]}]")


def test_put_with_duplicate_ids(tq: TransferQueue) -> None:
    rejected(tq, lambda: tq.put("p", [2, 3, 2], rewards([1.0, 2.0, 3.0])), "duplicate", "[2]")


def test_put_with_wrong_row_count(tq: TransferQueue) -> None:
    rejected(tq, lambda: tq.put("p", [2, 3], rewards([1.0])), "1 rows", "2 sample ids", "[2, 3]")


def test_put_of_a_column_already_stored(tq: TransferQueue) -> None:
    rejected(
        tq,
        lambda: tq.put("p", [3, 1], rewards([1.0, 2.0])),
        "column 'reward'",
        "already stored",
        "reward_fn",
        "[1]",
        "write-once",
    )


def test_put_is_atomic_across_columns(tq: TransferQueue) -> None:
    batch = pa.record_batch(
        {
            "advantage": pa.array([1.0, 2.0], pa.float32()),
            "reward": pa.array([1.0, 2.0], pa.float32()),
        }
    )
    rejected(tq, lambda: tq.put("p", [0, 2], batch), "column 'reward'", "[0]")
    assert "advantage" not in tq.schema("p").names
    assert tq.get("t", ["advantage"], "p") is None


def test_put_with_a_different_dtype(tq: TransferQueue) -> None:
    wrong = pa.record_batch({"reward": pa.array([1.0, 2.0], pa.float64())})
    rejected(tq, lambda: tq.put("p", [2, 3], wrong), "column 'reward'", "float", "double")


def test_add_rows_with_a_different_dtype(tq: TransferQueue) -> None:
    wrong = pa.record_batch({"prompt_ids": pa.array([[1]], pa.list_(pa.int64()))})
    rejected(
        tq,
        lambda: tq.add_rows("p", wrong),
        "column 'prompt_ids'",
        "list<item: int32>",
        "list<item: int64>",
    )


def test_add_rows_with_a_sample_id_column(tq: TransferQueue) -> None:
    batch = pa.record_batch({"sample_id": pa.array([5]), "prompt_ids": pa.array([[1]], TOKENS)})
    rejected(tq, lambda: tq.add_rows("p", batch), "'sample_id'", "assigned by the queue")


def test_put_with_a_mismatched_sample_id_column(tq: TransferQueue) -> None:
    batch = pa.record_batch({"sample_id": pa.array([3, 2]), "x": pa.array([1, 2])})
    rejected(tq, lambda: tq.put("p", [2, 3], batch), "'sample_id'", "[2, 3]")


def test_non_integer_group_id(tq: TransferQueue) -> None:
    batch = pa.record_batch({"group_id": pa.array(["a"])})
    rejected(tq, lambda: tq.add_rows("q", batch), "column 'group_id'", "integer")


def test_gather_of_a_column_never_written(tq: TransferQueue) -> None:
    rejected(
        tq, lambda: tq.gather("p", ["prompt_ids", "advantage"]), "'advantage'", "never written"
    )


def test_gather_of_a_column_not_ready_for_some_rows(tq: TransferQueue) -> None:
    rejected(tq, lambda: tq.gather("p", ["reward"]), "column 'reward'", "not ready", "[2, 3]")
    rejected(tq, lambda: tq.gather("p", ["reward"], [0, 3]), "column 'reward'", "[3]")
    rejected(tq, lambda: tq.gather("p", ["reward"], [0, 42]), "[42]", "do not exist")


def test_ack_twice(tq: TransferQueue) -> None:
    lease = tq.get("t", ["reward"], "p")
    tq.ack(lease)
    rejected(tq, lambda: tq.ack(lease), f"lease {lease.lease_id}", "already acked")
    rejected(tq, lambda: tq.release(lease), f"lease {lease.lease_id}", "already acked")


def test_ack_of_a_released_lease(tq: TransferQueue) -> None:
    lease = tq.get("t", ["reward"], "p")
    tq.release(lease)
    rejected(tq, lambda: tq.ack(lease.lease_id), f"lease {lease.lease_id}", "already released")


def test_ack_of_an_unknown_lease(tq: TransferQueue) -> None:
    rejected(tq, lambda: tq.ack(12345), "lease 12345", "never handed out")
    rejected(tq, lambda: tq.ack("lease-1"), "expected a Lease")


def test_ack_after_clear(tq: TransferQueue) -> None:
    tq.add_rows("q", prompts_batch([[1]]))
    lease = tq.get("t", ["prompt_ids"], "q")
    tq.clear("q")
    rejected(tq, lambda: tq.ack(lease), f"lease {lease.lease_id}", "'q' was cleared")


def test_bad_get_arguments(tq: TransferQueue) -> None:
    rejected(tq, lambda: tq.get("t", ["reward"], "p", batch_size=0), "batch_size", "0")
    rejected(tq, lambda: tq.get("t", ["reward", "reward"], "p"), "['reward']", "more than once")
    rejected(tq, lambda: tq.get("t", "reward", "p"), "list of names")


def test_more_bad_get_arguments(tq: TransferQueue) -> None:
    get = tq.get
    rejected(tq, lambda: get("t", ["reward"], "p", timeout=-1), "timeout", "-1")
    rejected(tq, lambda: get("t", ["reward"], "p", timeout=float("nan")), "timeout", "nan")
    rejected(tq, lambda: get("t", ["reward"], "p", lease_timeout=0), "lease_timeout", "0")
    rejected(tq, lambda: get("t", ["reward"], "p", lease_timeout=-2.0), "lease_timeout")
    rejected(tq, lambda: get("t", ["reward"], "p", min_rows=0), "min_rows", "0")
    rejected(
        tq,
        lambda: get("t", ["reward"], "p", batch_size=2, min_rows=3),
        "min_rows 3",
        "batch_size 2",
    )
    rejected(tq, lambda: get("t", ["reward"], "p", max_staleness=-1), "max_staleness", "-1")
    rejected(tq, lambda: get("t", ["reward"], "p", owner=7), "owner", "7")
    rejected(tq, lambda: get(3, ["reward"], "p"), "task must be a str")


def test_bad_get_group_arguments(tq: TransferQueue) -> None:
    group = tq.get_group
    rejected(tq, lambda: group("t", ["reward"], "p", ranks=0), "ranks", "0")
    rejected(tq, lambda: group("t", ["reward"], "p", ranks=2, balance="fair"), "'fair'", "known")
    rejected(tq, lambda: group("t", ["reward"], "p", ranks=2, timeout=-0.5), "timeout")
    rejected(tq, lambda: group("t", ["reward"], "p", ranks=2, same_view="yes"), "same_view")
    rejected(tq, lambda: group("t", ["nope"], "p", ranks=0), "ranks")  # checked before data


def test_bad_queue_settings() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(QueueError, match="capacity_rows must be an int >= 1"):
            TransferQueue(capacity_rows=bad)
    with pytest.raises(QueueError, match="list of task names"):
        TransferQueue(consumers="train")
    with pytest.raises(QueueError, match="at least one consumer"):
        TransferQueue(consumers=[])


# ---- leases: owners and deadlines --------------------------------------------------------


class FakeClock:
    """Lease deadlines without sleeping: tests move time by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_expired_lease_is_redelivered_and_its_late_ack_fails() -> None:
    clock = FakeClock()
    tq = TransferQueue(clock=clock)
    tq.add_rows("p", prompts_batch([[1], [2], [3]]))
    slow = tq.get("t", ["prompt_ids"], "p", batch_size=2, lease_timeout=10, owner="w1")
    assert slow.deadline == 110.0 and slow.owner == "w1"
    forever = tq.get("t", ["prompt_ids"], "p")  # no deadline: never expires
    clock.now = 109.9
    assert tq.get("t", ["prompt_ids"], "p") is None
    clock.now = 110.0
    again = tq.get("t", ["prompt_ids"], "p")  # swept at the start of the call
    assert again.sample_ids.tolist() == [0, 1]
    rejected_ack = pytest.raises(QueueError, match=rf"lease {slow.lease_id}: it expired")
    with rejected_ack:
        tq.ack(slow)
    with pytest.raises(QueueError, match="expired"):
        tq.release(slow)
    tq.ack(again)
    tq.ack(forever)
    assert tq.pending("t", ["prompt_ids"], "p") == 0


def test_expire_returns_the_expired_leases() -> None:
    clock = FakeClock()
    tq = TransferQueue(clock=clock)
    tq.add_rows("p", prompts_batch([[1], [2], [3]]))
    a = tq.get("t", ["prompt_ids"], "p", batch_size=1, lease_timeout=1)
    b = tq.get("t", ["prompt_ids"], "p", batch_size=1, lease_timeout=5)
    c = tq.get("t", ["prompt_ids"], "p", batch_size=1, lease_timeout=2)
    tq.ack(c)  # acked leases never expire
    clock.now += 3
    assert tq.expire() == [a.lease_id]
    assert tq.stats()["leases_by_task"] == {"t": 1}
    clock.now += 10
    assert tq.expire() == [b.lease_id]
    assert tq.expire() == []


def test_release_owner_redelivers_only_that_owners_leases() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[i] for i in range(6)]))
    w1 = tq.get("t", ["prompt_ids"], "p", batch_size=2, owner="tcp://w1")
    w2 = tq.get("t", ["prompt_ids"], "p", batch_size=2, owner="tcp://w2")
    w1_again = tq.get("u", ["prompt_ids"], "p", batch_size=1, owner="tcp://w1")
    assert tq.release_owner("tcp://w1") == [w1.lease_id, w1_again.lease_id]
    assert tq.release_owner("tcp://w1") == []  # nothing left; unknown owners too
    assert tq.release_owner("tcp://nobody") == []
    with pytest.raises(QueueError, match="released because its owner 'tcp://w1' was lost"):
        tq.ack(w1)
    redelivered = tq.get("t", ["prompt_ids"], "p")
    assert redelivered.sample_ids.tolist() == [0, 1, 4, 5]
    tq.ack(w2)
    tq.ack(redelivered)
    assert tq.get("u", ["prompt_ids"], "p").sample_ids.tolist() == list(range(6))
    with pytest.raises(QueueError, match="owner must be a str"):
        tq.release_owner(None)


# ---- waiting -----------------------------------------------------------------------------


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run fn in a daemon thread; the dict gets 'result' or 'error', and 'seconds'."""
    out: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            out["error"] = exc
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def finished(thread: threading.Thread, out: dict) -> object:
    thread.join(timeout=10)
    assert not thread.is_alive(), "the waiting call never returned"
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_timeout_zero_is_the_non_blocking_get_and_a_short_wait_gives_up() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[1]]))
    assert tq.get("t", ["reward"], "p") is None
    start = time.monotonic()
    assert tq.get("t", ["reward"], "p", timeout=0.05) is None
    assert time.monotonic() - start >= 0.05


def test_a_waiting_consumer_wakes_when_a_producer_puts() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([[1], [2]]))
    thread, out = in_thread(tq.get, "train", ["reward"], "p", timeout=5)
    time.sleep(0.05)  # let it start waiting (the test holds either way)
    in_thread(tq.put, "p", ids, rewards([1.0, 2.0]))
    lease = finished(thread, out)
    assert lease.sample_ids.tolist() == [0, 1]
    assert out["seconds"] < 4, "woke on the put, well before the timeout"


def test_two_waiting_tasks_do_not_block_each_other() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([[1], [2]]))
    a_thread, a_out = in_thread(tq.get, "a", ["x"], "p", timeout=5)
    b_thread, b_out = in_thread(tq.get, "b", ["y"], "p", timeout=5)
    time.sleep(0.05)
    tq.put("p", ids, pa.record_batch({"y": pa.array([1, 2])}))
    assert finished(b_thread, b_out).sample_ids.tolist() == [0, 1]
    assert a_thread.is_alive(), "task a still waits for x; its wait did not hold b up"
    tq.put("p", ids, pa.record_batch({"x": pa.array([1, 2])}))
    assert finished(a_thread, a_out).task == "a"
    assert a_out["seconds"] < 4 and b_out["seconds"] < 4


def test_min_rows_waits_until_enough_rows_are_ready() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[1], [2]]))
    assert tq.get("t", ["prompt_ids"], "p", min_rows=3) is None
    thread, out = in_thread(tq.get, "t", ["prompt_ids"], "p", min_rows=3, timeout=5)
    time.sleep(0.05)
    tq.add_rows("p", prompts_batch([[3]]))
    assert finished(thread, out).sample_ids.tolist() == [0, 1, 2]


def test_a_waiter_wakes_when_a_lease_expires() -> None:
    tq = TransferQueue()  # real clock: nobody calls the queue while the waiter waits
    tq.add_rows("p", prompts_batch([[1]]))
    stuck = tq.get("t", ["prompt_ids"], "p", lease_timeout=0.1)
    lease = tq.get("t", ["prompt_ids"], "p", timeout=5)
    assert lease.sample_ids.tolist() == [0]
    with pytest.raises(QueueError, match="expired"):
        tq.ack(stuck)


def test_waiting_forever_is_allowed() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([[1]]))
    thread, out = in_thread(tq.get, "t", ["reward"], "p", timeout=None)
    time.sleep(0.05)
    tq.put("p", ids, rewards([1.0]))
    assert finished(thread, out).sample_ids.tolist() == [0]


def test_a_partition_cleared_under_a_waiter_is_an_error() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[1]]))
    thread, out = in_thread(tq.get, "t", ["reward"], "p", timeout=5)
    time.sleep(0.05)
    tq.clear("p")
    with pytest.raises(QueueError, match="unknown partition 'p'"):
        finished(thread, out)


# ---- sealing -----------------------------------------------------------------------------


def test_seal_lets_a_waiter_take_the_remainder() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[1], [2], [3]]))
    first = tq.get("t", ["prompt_ids"], "p", batch_size=2, min_rows=2)
    thread, out = in_thread(tq.get, "t", ["prompt_ids"], "p", batch_size=2, min_rows=2, timeout=5)
    time.sleep(0.05)
    tq.seal("p")
    assert finished(thread, out).sample_ids.tolist() == [2]
    assert out["seconds"] < 4
    assert tq.get("t", ["prompt_ids"], "p", min_rows=2) is None
    tq.ack(first)
    assert tq.stats()["partitions"]["p"]["sealed"]


def test_sealed_remainder_still_waits_for_rows_not_ready_yet() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([[1], [2], [3]]))
    tq.seal("p")
    tq.put("p", ids[:2], rewards([1.0, 2.0]))
    # row 2 will get its reward later, so two rows are not yet "the remainder"
    assert tq.get("t", ["reward"], "p", min_rows=3) is None
    tq.put("p", ids[2:], rewards([3.0]))
    assert tq.get("t", ["reward"], "p", min_rows=5).sample_ids.tolist() == [0, 1, 2]


def test_is_drained_once_sealed_and_every_row_acked() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[1], [2]]))
    lease = tq.get("t", ["prompt_ids"], "p")
    tq.ack(lease)
    assert not tq.is_drained("t", ["prompt_ids"], "p")  # more rows may come
    tq.seal("p")
    assert tq.is_drained("t", ["prompt_ids"], "p")
    assert not tq.is_drained("other", ["prompt_ids"], "p")
    start = time.monotonic()
    assert tq.get("t", ["prompt_ids"], "p", timeout=5) is None  # nothing can ever come
    assert time.monotonic() - start < 4


def test_a_drained_task_waiting_forever_returns_none_when_the_last_lease_is_acked() -> None:
    tq = TransferQueue()
    tq.add_rows("p", prompts_batch([[1]]))
    tq.seal("p")
    lease = tq.get("t", ["prompt_ids"], "p")
    thread, out = in_thread(tq.get, "t", ["prompt_ids"], "p", timeout=None)
    time.sleep(0.05)
    assert thread.is_alive(), "the lease could still be released, so it waits"
    tq.ack(lease)
    assert finished(thread, out) is None


def test_add_rows_after_seal_is_refused(tq: TransferQueue) -> None:
    tq.seal("p")
    tq.seal("p")  # idempotent
    rejected(tq, lambda: tq.add_rows("p", prompts_batch([[1]])), "'p'", "sealed")
    rejected(tq, lambda: tq.add_rows("p", prompts_batch([])), "sealed")
    tq.put("p", [2, 3], rewards([1.0, 2.0]))  # new columns for its rows are fine


# ---- staleness ---------------------------------------------------------------------------


def versioned(versions: list[int | None]) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "prompt_ids": pa.array([[1]] * len(versions), TOKENS),
            "policy_version": pa.array(versions, pa.int64()),
        }
    )


def test_max_staleness_offers_only_recent_rows() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", versioned([0, 1, 2, 3, None]))
    tq.set_policy_version(3)
    assert tq.policy_version == 3
    fresh = tq.get("t", ["prompt_ids"], "p", max_staleness=1)
    assert fresh.sample_ids.tolist() == [ids[2], ids[3], ids[4]]  # no version = fresh
    assert tq.stale("p", 1).tolist() == [ids[0], ids[1]]
    assert tq.stale("p", 0).tolist() == [ids[0], ids[1], ids[2]]
    assert tq.get("t", ["prompt_ids"], "p", max_staleness=1) is None
    everything = tq.get("t", ["prompt_ids"], "p")  # no bound: stale rows too
    assert everything.sample_ids.tolist() == [ids[0], ids[1]]


def test_policy_version_from_a_later_put_counts() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", prompts_batch([[1], [2]]))
    tq.put("p", ids, pa.record_batch({"policy_version": pa.array([0, 5], pa.int64())}))
    tq.set_policy_version(5)
    assert tq.get("t", ["prompt_ids"], "p", max_staleness=2).sample_ids.tolist() == [1]


def test_stale_rows_can_be_evicted_so_the_task_drains() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", versioned([0, 4]))
    tq.seal("p")
    tq.set_policy_version(4)
    lease = tq.get("t", ["prompt_ids"], "p", max_staleness=1)
    tq.ack(lease)
    assert not tq.is_drained("t", ["prompt_ids"], "p")
    assert tq.get("t", ["prompt_ids"], "p", max_staleness=1, timeout=5) is None  # hopeless
    tq.evict("p", tq.stale("p", 1))
    assert tq.is_drained("t", ["prompt_ids"], "p")
    with pytest.raises(QueueError, match=rf"sample ids \[{ids[0]}\] were evicted"):
        tq.gather("p", ["prompt_ids"], [ids[0]])


def test_policy_versions_only_go_forward(tq: TransferQueue) -> None:
    tq.set_policy_version(2)
    tq.set_policy_version(2)
    rejected(tq, lambda: tq.set_policy_version(1), "current is 2", "got 1")
    rejected(tq, lambda: tq.set_policy_version(-1), "version must be an int >= 0")
    rejected(tq, lambda: tq.set_policy_version(2.5), "version must be an int >= 0")
    rejected(tq, lambda: tq.stale("p", -1), "max_staleness", "-1")
    rejected(tq, lambda: tq.stale("p", None), "max_staleness")
    assert tq.stats()["policy_version"] == 2


# ---- capacity ----------------------------------------------------------------------------


def test_a_full_queue_raises_queue_full_after_its_timeout() -> None:
    tq = TransferQueue(capacity_rows=3)
    tq.add_rows("p", prompts_batch([[1], [2]]))
    with pytest.raises(QueueFull) as info:
        tq.add_rows("p", prompts_batch([[3], [4]]), timeout=0.05)
    message = str(info.value)
    assert "capacity_rows 3" in message and "2 live rows" in message and "2 new" in message
    assert (info.value.capacity_rows, info.value.live_rows, info.value.requested) == (3, 2, 2)
    assert isinstance(info.value, QueueError)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is QueueFull and str(copy) == message and copy.live_rows == 2
    with pytest.raises(QueueFull):
        tq.add_rows("q", prompts_batch([[3], [4]]), timeout=0)  # 0: do not wait at all
    assert tq.partitions() == ["p"] and tq.num_rows("p") == 2
    tq.add_rows("p", prompts_batch([[3]]), timeout=0)  # fits exactly
    assert tq.live_rows() == 3
    tq.add_rows("p", prompts_batch([]), timeout=0)  # nothing to fit


def test_a_batch_larger_than_the_capacity_is_refused_at_once() -> None:
    tq = TransferQueue(capacity_rows=2)
    tq.add_rows("p", prompts_batch([[1]]))
    with pytest.raises(QueueError, match=r"3 rows can never fit.*capacity_rows is 2") as info:
        tq.add_rows("p", prompts_batch([[1], [2], [3]]))  # would otherwise wait forever
    assert not isinstance(info.value, QueueFull)
    with pytest.raises(QueueError, match="timeout must be None or seconds >= 0"):
        tq.add_rows("p", prompts_batch([[1]]), timeout=-1)
    assert tq.num_rows("p") == 1


def test_capacity_blocks_a_producer_until_a_consumer_acks_and_eviction_frees_room() -> None:
    tq = TransferQueue(capacity_rows=4, consumers=["train"])
    tq.add_rows("p", prompts_batch([[1], [2], [3], [4]]))
    thread, out = in_thread(tq.add_rows, "p", prompts_batch([[5], [6]]), timeout=5)
    time.sleep(0.05)
    assert thread.is_alive(), "no room: the producer must wait"
    lease = tq.get("train", ["prompt_ids"], "p", batch_size=1)
    tq.ack(lease)
    time.sleep(0.05)
    assert thread.is_alive(), "one row freed, two needed"
    tq.ack(tq.get("train", ["prompt_ids"], "p", batch_size=1))
    assert finished(thread, out).tolist() == [4, 5]
    assert out["seconds"] < 4
    assert tq.live_rows() == 4
    stats = tq.stats()
    assert (stats["live_rows"], stats["evicted_rows"], stats["capacity_rows"]) == (4, 2, 4)


def test_clear_frees_capacity() -> None:
    tq = TransferQueue(capacity_rows=2)
    tq.add_rows("old", prompts_batch([[1], [2]]))
    thread, out = in_thread(tq.add_rows, "new", prompts_batch([[3]]), timeout=5)
    time.sleep(0.05)
    tq.clear("old")
    assert finished(thread, out).tolist() == [2]


# ---- eviction ----------------------------------------------------------------------------


def test_rows_are_evicted_once_every_declared_consumer_acked() -> None:
    tq = TransferQueue(consumers=["reward", "train"])
    ids = tq.add_rows("p", prompts_batch([[1, 2], [3]]))
    full_bytes = tq.stats()["bytes"]
    tq.ack(tq.get("reward", ["prompt_ids"], "p", batch_size=1))
    tq.ack(tq.get("train", ["prompt_ids"], "p"))
    assert tq.gather("p", ["prompt_ids"]).column("sample_id").to_pylist() == [1]
    with pytest.raises(QueueError, match=r"sample ids \[0\] were evicted"):
        tq.gather("p", ["prompt_ids"], ids)
    assert tq.stats()["bytes"] == full_bytes, "row 1 still lives in the same chunk"
    assert tq.stats()["partitions"]["p"]["evicted"] == 1
    tq.ack(tq.get("reward", ["prompt_ids"], "p"))
    stats = tq.stats()
    assert stats["bytes"] == 0, "the chunk is freed with its last row"
    assert (stats["rows"], stats["live_rows"], stats["evicted_rows"]) == (2, 0, 2)
    assert tq.gather("p", ["prompt_ids"]).num_rows == 0
    assert tq.ready("p", ["prompt_ids"]).tolist() == []


def test_chunks_written_by_put_are_freed_too() -> None:
    tq = TransferQueue(consumers=["train"])
    prompts = prompts_batch([[1], [2], [3], [4]])
    ids = tq.add_rows("p", prompts)
    tq.put("p", ids[:2], rewards([1.0, 2.0]))
    tq.put("p", ids[2:], rewards([3.0, 4.0]))
    assert tq._storage.chunks_held("p") == 3
    tq.ack(tq.get("train", ["reward"], "p", batch_size=2))
    # the prompts chunk still holds rows 2 and 3; the first rewards chunk is gone
    assert tq._storage.chunks_held("p") == 2
    assert tq.stats()["bytes"] == prompts.nbytes + rewards([3.0, 4.0]).nbytes
    tq.ack(tq.get("train", ["reward"], "p"))
    assert tq._storage.chunks_held("p") == 0 and tq.stats()["bytes"] == 0


def test_without_declared_consumers_nothing_is_evicted(tq: TransferQueue) -> None:
    for task in ("a", "b"):
        tq.ack(tq.get(task, ["prompt_ids"], "p"))
    assert tq.gather("p", ["prompt_ids"]).num_rows == 4
    assert tq.stats()["evicted_rows"] == 0 and tq.stats()["partitions"]["p"]["consumers"] is None


def test_declare_consumers_per_partition(tq: TransferQueue) -> None:
    tq.ack(tq.get("a", ["prompt_ids"], "p", batch_size=3))
    tq.declare_consumers("p", ["a"])  # rows a already acked go at once
    assert tq.gather("p", ["prompt_ids"]).column("sample_id").to_pylist() == [3]
    tq.declare_consumers("fresh", ["a", "b"])  # before any rows: creates the partition
    assert "fresh" in tq.partitions()
    ids = tq.add_rows("fresh", prompts_batch([[1]]))
    tq.ack(tq.get("a", ["prompt_ids"], "fresh"))
    assert tq.gather("fresh", ["prompt_ids"], ids).num_rows == 1  # b has not acked yet
    tq.ack(tq.get("b", ["prompt_ids"], "fresh"))
    assert tq.stats()["partitions"]["fresh"]["evicted"] == 1
    with pytest.raises(QueueError, match="at least one consumer"):
        tq.declare_consumers("p", [])
    with pytest.raises(QueueError, match="list of task names"):
        tq.declare_consumers("p", "a")


def test_evicted_rows_reach_no_task_and_take_no_writes() -> None:
    tq = TransferQueue(consumers=["a"])
    ids = tq.add_rows("p", prompts_batch([[1], [2]]))
    tq.ack(tq.get("a", ["prompt_ids"], "p", batch_size=1))
    assert tq.get("logger", ["prompt_ids"], "p").sample_ids.tolist() == [1]
    assert tq.pending("logger", ["prompt_ids"], "p") == 0
    with pytest.raises(QueueError, match=r"put to partition 'p'.*\[0\] were evicted"):
        tq.put("p", ids[:1], rewards([1.0]))


def test_evict_refuses_leased_and_evicted_rows(tq: TransferQueue) -> None:
    lease = tq.get("t", ["prompt_ids"], "p", batch_size=1)
    rejected(tq, lambda: tq.evict("p", [0, 1]), "[0]", "leased by task 't'")
    rejected(tq, lambda: tq.evict("p", [9]), "[9]", "do not exist")
    tq.release(lease)
    tq.evict("p", [0])
    rejected(tq, lambda: tq.evict("p", [0]), "[0]", "already evicted")
    assert tq.live_rows() == 3


# ---- groups of ranks ---------------------------------------------------------------------


def sized(lengths: list[int], groups: list[int] | None = None) -> pa.RecordBatch:
    return prompts_batch([[7] * n for n in lengths], groups)


def test_get_group_balances_tokens_across_ranks() -> None:
    tq = TransferQueue()
    lengths = [9, 1, 1, 1, 5, 5, 2, 2]
    tq.add_rows("p", sized(lengths))
    leases = tq.get_group("train", ["prompt_ids"], "p", ranks=2, owner="w", lease_timeout=60)
    assert len(leases) == 2 and all(lease.owner == "w" for lease in leases)
    tokens = [sum(len(x) for x in lease.batch.column("prompt_ids").to_pylist()) for lease in leases]
    assert tokens == [13, 13]
    ids = sorted(i for lease in leases for i in lease.sample_ids.tolist())
    assert ids == list(range(8))
    assert len({lease.lease_id for lease in leases}) == 2
    tq.ack(leases[0])
    tq.release(leases[1])  # ranks are independent when the rows are split
    assert sorted(tq.get("train", ["prompt_ids"], "p").sample_ids.tolist()) == sorted(
        leases[1].sample_ids.tolist()
    )


def test_get_group_keeps_whole_groups_on_one_rank() -> None:
    tq = TransferQueue()
    # groups 0..3 of two rows each, 6, 2, 8 and 4 tokens: only {0, 3} | {1, 2} is even
    tq.add_rows("p", sized([3, 3, 1, 1, 4, 4, 2, 2], [0, 0, 1, 1, 2, 2, 3, 3]))
    leases = tq.get_group(
        "train", ["prompt_ids", "group_id"], "p", ranks=2, sampler=samplers.group_preserving
    )
    groups = [lease.batch.column("group_id").to_pylist() for lease in leases]
    assert sorted(groups) == [[0, 0, 3, 3], [1, 1, 2, 2]]


def test_get_group_waits_until_every_rank_can_get_a_row() -> None:
    tq = TransferQueue()
    tq.add_rows("p", sized([1, 2, 3]))
    assert tq.get_group("t", ["prompt_ids"], "p", ranks=4) is None
    thread, out = in_thread(tq.get_group, "t", ["prompt_ids"], "p", ranks=4, timeout=5)
    time.sleep(0.05)
    tq.add_rows("p", sized([4]))
    assert [len(lease) for lease in finished(thread, out)] == [1, 1, 1, 1]


def test_get_group_on_a_sealed_partition_returns_fewer_but_never_empty_leases() -> None:
    tq = TransferQueue()
    tq.add_rows("p", sized([1, 2, 3]))
    tq.seal("p")
    leases = tq.get_group("t", ["prompt_ids"], "p", ranks=4, balance=None)
    assert [lease.sample_ids.tolist() for lease in leases] == [[0], [1], [2]]


def test_get_group_respects_batch_size_and_min_rows_over_the_whole_group() -> None:
    tq = TransferQueue()
    tq.add_rows("p", sized([1] * 10))
    leases = tq.get_group("t", ["prompt_ids"], "p", ranks=2, batch_size=6, balance=None)
    assert [lease.sample_ids.tolist() for lease in leases] == [[0, 1, 2], [3, 4, 5]]
    assert tq.get_group("t", ["prompt_ids"], "p", ranks=2, min_rows=5) is None
    assert len(tq.get_group("t", ["prompt_ids"], "p", ranks=2, min_rows=4)) == 2


def test_same_view_rows_are_consumed_only_when_every_rank_acked() -> None:
    tq = TransferQueue()
    tq.add_rows("p", sized([1, 2, 3]))
    view = tq.get_group("t", ["prompt_ids"], "p", ranks=3, batch_size=2, same_view=True)
    assert [lease.sample_ids.tolist() for lease in view] == [[0, 1]] * 3
    assert len({lease.lease_id for lease in view}) == 3
    assert view[0].batch.equals(view[2].batch)
    tq.ack(view[0])
    tq.ack(view[1])
    rest = tq.get("t", ["prompt_ids"], "p")
    assert rest.sample_ids.tolist() == [2]  # not 0, 1: still out with rank 2
    assert tq.stats()["leases_by_task"] == {"t": 2}
    tq.ack(view[2])
    tq.ack(rest)
    assert tq.pending("t", ["prompt_ids"], "p") == 0
    assert tq.get("t", ["prompt_ids"], "p") is None


def test_releasing_one_same_view_lease_gives_the_rows_back_and_ends_the_others() -> None:
    tq = TransferQueue()
    tq.add_rows("p", sized([1, 2]))
    view = tq.get_group("t", ["prompt_ids"], "p", ranks=3, same_view=True)
    tq.ack(view[0])
    tq.release(view[1])
    with pytest.raises(QueueError, match=rf"released with lease {view[1].lease_id} of its same-v"):
        tq.ack(view[2])
    again = tq.get_group("t", ["prompt_ids"], "p", ranks=2, same_view=True)
    assert [lease.sample_ids.tolist() for lease in again] == [[0, 1], [0, 1]]


def test_same_view_leases_expire_and_die_with_their_owner_together() -> None:
    clock = FakeClock()
    tq = TransferQueue(clock=clock)
    tq.add_rows("p", sized([1, 2]))
    view = tq.get_group("t", ["prompt_ids"], "p", ranks=2, same_view=True, lease_timeout=5)
    clock.now += 5
    assert tq.expire() == [view[0].lease_id, view[1].lease_id]
    lost = tq.get_group("t", ["prompt_ids"], "p", ranks=2, same_view=True, owner="w9")
    assert tq.release_owner("w9") == [lease.lease_id for lease in lost]
    with pytest.raises(QueueError, match="owner 'w9' was lost"):
        tq.ack(lost[1])
    assert tq.pending("t", ["prompt_ids"], "p") == 2


def test_eviction_waits_for_every_rank_of_a_same_view_group() -> None:
    tq = TransferQueue(consumers=["t"])
    tq.add_rows("p", sized([1]))
    view = tq.get_group("t", ["prompt_ids"], "p", ranks=2, same_view=True)
    tq.ack(view[0])
    assert tq.live_rows() == 1
    tq.ack(view[1])
    assert tq.live_rows() == 0


def test_token_budget_through_the_queue() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", sized([3, 3, 3]))
    tq.put("p", ids, pa.record_batch({"response_ids": pa.array([[1], [1, 1], []], TOKENS)}))
    lease = tq.get("t", ["prompt_ids"], "p", sampler=samplers.token_budget(9))
    assert lease.sample_ids.tolist() == [0, 1]  # 4 + 5 tokens
    assert tq.get(
        "t", ["prompt_ids"], "p", sampler=samplers.token_budget(1)
    ).sample_ids.tolist() == [2]


def test_stats_count_leases_per_task() -> None:
    tq = TransferQueue(capacity_rows=10, consumers=["a"])
    tq.add_rows("p", sized([1, 1, 1]))
    tq.get("a", ["prompt_ids"], "p", batch_size=1)
    tq.get("a", ["prompt_ids"], "p", batch_size=1)
    tq.get("b", ["prompt_ids"], "p")
    tq.set_policy_version(7)
    stats = tq.stats()
    assert stats["leases_by_task"] == {"a": 2, "b": 1}
    assert stats["leases_in_flight"] == 3
    assert (stats["capacity_rows"], stats["live_rows"], stats["policy_version"]) == (10, 3, 7)
    assert stats["partitions"]["p"]["consumers"] == ["a"]
    assert stats["partitions"]["p"]["live_rows"] == 3


# ---- random interleavings ----------------------------------------------------------------

TASK_COLUMNS = {"reward": ["prompt_ids", "a"], "train": ["a", "b"], "log": ["prompt_ids"]}
CONSUMERS = ["reward", "log"]  # "train" is not declared: it only sees rows not yet evicted
OWNERS = st.sampled_from(["w0", "w1"])  # drain() covers leases without an owner
LEASE_TIMEOUTS = st.sampled_from([None, 1.0, 3.0])


class QueueMachine(RuleBasedStateMachine):
    """Producers add rows and put columns, consumers get/ack/release, in any order.

    Leases carry an owner and maybe a deadline; time moves forward (expiry redelivers),
    owners are lost (their leases are redelivered), and a row both declared consumers acked
    is evicted - gone for the undeclared "train" too. Through all of it: no row is handed to
    a task twice once acked, none is lost, and at the end each consumer acked every row
    exactly once, and "train" every row that was not evicted before it got there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.tq = TransferQueue(consumers=CONSUMERS, clock=self.clock)
        empty = pa.record_batch(
            {"prompt_ids": pa.array([], TOKENS), "group_id": pa.array([], pa.int64())}
        )
        assert len(self.tq.add_rows("p", empty)) == 0
        self.rows: dict[int, dict] = {}  # sample id -> column -> value (the model)
        self.next_group = 0
        self.leases: dict[int, Lease] = {}  # outstanding
        self.retired: dict[int, str] = {}  # ended lease id -> what its late ack must say
        self.acked: dict[str, list[int]] = {task: [] for task in TASK_COLUMNS}

    # -- model helpers
    def leased(self, task: str) -> set[int]:
        return {i for lease in self.leases.values() if lease.task == task for i in lease.sample_ids}

    def free(self, task: str) -> set[int]:
        return set(self.rows) - set(self.acked[task]) - self.leased(task) - self.evicted()

    def available(self, task: str) -> set[int]:
        cols = TASK_COLUMNS[task]
        return {i for i in self.free(task) if all(c in self.rows[i] for c in cols)}

    def missing(self, column: str) -> list[int]:
        """Rows a producer may still write `column` to (evicted rows take no writes)."""
        evicted = self.evicted()
        return sorted(i for i, row in self.rows.items() if column not in row and i not in evicted)

    def evicted(self) -> set[int]:
        return set(self.rows).intersection(*(set(self.acked[task]) for task in CONSUMERS))

    def check_batch(self, lease: Lease) -> None:
        ids = lease.sample_ids.tolist()
        expected = {"sample_id": ids}
        for column in TASK_COLUMNS[lease.task]:
            expected[column] = [self.rows[i][column] for i in ids]
        assert lease.batch.to_pydict() == expected

    def handed_out(self, lease: Lease, owner: str | None, lease_timeout: float | None) -> None:
        assert lease.owner == owner
        assert lease.deadline == (None if lease_timeout is None else self.clock.now + lease_timeout)
        self.check_batch(lease)
        self.leases[lease.lease_id] = lease

    # -- producers
    @rule(data=st.data())
    def add_rows(self, data: st.DataObject) -> None:
        prompts = data.draw(
            st.lists(st.lists(st.integers(-9, 9), max_size=4), min_size=1, max_size=4)
        )
        group = self.next_group
        self.next_group += 1
        ids = self.tq.add_rows("p", prompts_batch(prompts, [group] * len(prompts)))
        assert len(ids) == len(prompts)
        assert all(i > max(self.rows, default=-1) for i in ids.tolist())
        for i, prompt in zip(ids.tolist(), prompts, strict=True):
            self.rows[i] = {"prompt_ids": prompt, "group_id": group}

    def put(self, data: st.DataObject, column: str, values: st.SearchStrategy, typ) -> None:
        if data.draw(st.booleans(), label="every missing row"):  # a producer catching up
            ids = self.missing(column)
        else:
            ids = data.draw(
                st.lists(st.sampled_from(self.missing(column)), min_size=1, unique=True)
            )
        vals = data.draw(st.lists(values, min_size=len(ids), max_size=len(ids)))
        self.tq.put("p", ids, pa.record_batch({column: pa.array(vals, typ)}), producer=column)
        for i, v in zip(ids, vals, strict=True):
            self.rows[i][column] = v

    @precondition(lambda self: self.missing("a"))
    @rule(data=st.data())
    def put_a(self, data: st.DataObject) -> None:
        self.put(data, "a", st.floats(-1e3, 1e3, allow_nan=False), pa.float64())

    @precondition(lambda self: self.missing("b"))
    @rule(data=st.data())
    def put_b(self, data: st.DataObject) -> None:
        self.put(data, "b", st.lists(st.integers(0, 99), max_size=5), TOKENS)

    # -- consumers
    @rule(
        task=st.sampled_from(sorted(TASK_COLUMNS)),
        batch_size=st.none() | st.integers(1, 5),
        grouped=st.booleans(),
        owner=OWNERS,
        lease_timeout=LEASE_TIMEOUTS,
        later=st.sampled_from([0.0, 0.0, 1.5, 4.0]),
    )
    def get(
        self,
        task: str,
        batch_size: int | None,
        grouped: bool,
        owner: str | None,
        lease_timeout: float | None,
        later: float,
    ) -> None:
        self.advance(later)  # leases due by now are swept by the get itself
        sampler = samplers.group_preserving if grouped else samplers.sequential
        available = self.available(task)
        lease = self.tq.get(
            task,
            TASK_COLUMNS[task],
            "p",
            batch_size=batch_size,
            sampler=sampler,
            owner=owner,
            lease_timeout=lease_timeout,
        )
        complete = self.complete_groups(task, available) if grouped else None
        if lease is None:
            assert not (complete if grouped else available)
            return
        ids = lease.sample_ids.tolist()
        assert set(ids) <= available, "handed out a row not ready, leased or already acked"
        assert len(set(ids)) == len(ids)
        if grouped:
            groups = {self.rows[i]["group_id"] for i in ids}
            assert groups <= complete
            free = self.free(task)
            for g in groups:  # the whole open part of each group, nothing less
                assert {i for i in free if self.rows[i]["group_id"] == g} <= set(ids)
            if batch_size is not None and len(groups) > 1:
                assert len(ids) <= batch_size
        elif batch_size is not None:
            assert len(ids) == min(batch_size, len(available))
        self.handed_out(lease, owner, lease_timeout)

    def complete_groups(self, task: str, available: set[int]) -> set[int]:
        by_group: dict[int, set[int]] = {}
        for i in self.free(task):
            by_group.setdefault(self.rows[i]["group_id"], set()).add(i)
        return {g for g, members in by_group.items() if members <= available}

    @rule(
        task=st.sampled_from(sorted(TASK_COLUMNS)),
        ranks=st.integers(1, 3),
        batch_size=st.none() | st.integers(1, 6),
        balance=st.sampled_from([None, *samplers.BALANCE_METHODS]),
        owner=OWNERS,
        lease_timeout=LEASE_TIMEOUTS,
    )
    def get_group(
        self,
        task: str,
        ranks: int,
        batch_size: int | None,
        balance: str | None,
        owner: str | None,
        lease_timeout: float | None,
    ) -> None:
        chosen = sorted(self.available(task))[:batch_size]
        leases = self.tq.get_group(
            task,
            TASK_COLUMNS[task],
            "p",
            ranks=ranks,
            batch_size=batch_size,
            balance=balance,
            owner=owner,
            lease_timeout=lease_timeout,
        )
        if len(chosen) < ranks:  # not sealed: waits until every rank gets a row
            assert leases is None
            return
        assert len(leases) == ranks and all(len(lease) for lease in leases)
        shared = [i for lease in leases for i in lease.sample_ids.tolist()]
        assert sorted(shared) == chosen, "one sampler choice, split without loss or overlap"
        for lease in leases:
            self.handed_out(lease, owner, lease_timeout)

    @precondition(lambda self: any(self.available(task) for task in TASK_COLUMNS))
    @rule(task=st.sampled_from(sorted(TASK_COLUMNS)))
    def drain(self, task: str) -> None:
        """A consumer catching up: take and ack everything it can in one go."""
        available = self.available(task)
        lease = self.tq.get(task, TASK_COLUMNS[task], "p")
        if lease is None:
            assert not available
            return
        assert sorted(lease.sample_ids.tolist()) == sorted(available)
        self.check_batch(lease)
        self.tq.ack(lease)
        self.acked[task] += lease.sample_ids.tolist()
        self.retired[lease.lease_id] = "already acked"

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        lease = self.leases.pop(data.draw(st.sampled_from(sorted(self.leases))))
        self.tq.ack(lease)
        ids = lease.sample_ids.tolist()
        assert not set(ids) & set(self.acked[lease.task])
        self.acked[lease.task] += ids
        self.retired[lease.lease_id] = "already acked"

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease = self.leases.pop(data.draw(st.sampled_from(sorted(self.leases))))
        self.tq.release(lease)
        self.retired[lease.lease_id] = "already released"

    def advance(self, seconds: float) -> list[int]:
        """Move time on; the leases now due are expired on the queue's next call, any call."""
        self.clock.now += seconds
        due = sorted(
            lease_id
            for lease_id, lease in self.leases.items()
            if lease.deadline is not None and lease.deadline <= self.clock.now
        )
        for lease_id in due:
            del self.leases[lease_id]
            self.retired[lease_id] = "expired"
        return due

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 3.5]))
    def time_passes(self, seconds: float) -> None:
        due = self.advance(seconds)
        assert sorted(self.tq.expire()) == due

    @rule(owner=st.sampled_from(["w0", "w1"]))
    def owner_lost(self, owner: str) -> None:
        held = sorted(i for i, lease in self.leases.items() if lease.owner == owner)
        assert self.tq.release_owner(owner) == held
        for lease_id in held:
            del self.leases[lease_id]
            self.retired[lease_id] = f"owner {owner!r} was lost"

    @precondition(lambda self: self.retired)
    @rule(data=st.data())
    def ack_retired_lease(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.retired)))
        with pytest.raises(QueueError, match=f"lease {lease_id}") as info:
            self.tq.ack(lease_id)
        assert self.retired[lease_id] in str(info.value)

    # -- invariants
    @invariant()
    def pending_matches_the_model(self) -> None:
        for task, columns in TASK_COLUMNS.items():
            assert self.tq.pending(task, columns, "p") == len(self.available(task))

    @invariant()
    def no_row_acked_twice(self) -> None:
        for ids in self.acked.values():
            assert len(ids) == len(set(ids))

    @invariant()
    def counters_match_the_model(self) -> None:
        stats = self.tq.stats()
        evicted = self.evicted()
        assert stats["evicted_rows"] == len(evicted)
        assert stats["live_rows"] == self.tq.live_rows() == len(self.rows) - len(evicted)
        by_task: dict[str, int] = {}
        for lease in self.leases.values():
            by_task[lease.task] = by_task.get(lease.task, 0) + 1
        assert stats["leases_by_task"] == dict(sorted(by_task.items()))
        live = self.tq.gather("p", ["prompt_ids"]).column("sample_id").to_pylist()
        assert live == sorted(set(self.rows) - evicted), "evicted rows gone, live rows kept"
        if evicted:
            row = max(evicted)
            with pytest.raises(QueueError, match=rf"sample ids \[{row}\] were evicted"):
                self.tq.gather("p", ["prompt_ids"], [row])

    def teardown(self) -> None:
        """Produce every missing column, then drain: each task acks every row exactly once."""
        for column in ("a", "b"):
            ids = self.missing(column)
            if ids:
                values = [1.0] * len(ids) if column == "a" else [[1]] * len(ids)
                typ = pa.float64() if column == "a" else TOKENS
                self.tq.put("p", ids, pa.record_batch({column: pa.array(values, typ)}))
        for lease in self.leases.values():
            self.tq.ack(lease)
            self.acked[lease.task] += lease.sample_ids.tolist()
        for task, columns in TASK_COLUMNS.items():
            for _ in range(len(self.rows) + 1):  # bounded: a broken ack must fail, not hang
                lease = self.tq.get(task, columns, "p", batch_size=3)
                if lease is None:
                    break
                self.tq.ack(lease)
                self.acked[task] += lease.sample_ids.tolist()
            assert len(self.acked[task]) == len(set(self.acked[task])), task
            if task in CONSUMERS:
                assert sorted(self.acked[task]) == sorted(self.rows), task
            else:  # evicted rows never reach an undeclared task; nothing else is lost
                assert set(self.acked[task]) | self.evicted() == set(self.rows), task
        stats = self.tq.stats()
        assert stats["leases_in_flight"] == 0
        assert stats["live_rows"] == 0 and stats["bytes"] == 0, "all consumers acked: all evicted"


QueueMachine.TestCase.settings = settings(
    max_examples=75,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueMachine = QueueMachine.TestCase


# ---- threads -----------------------------------------------------------------------------


def test_concurrent_consumers_and_a_producer_lose_and_duplicate_nothing() -> None:
    tq = TransferQueue()
    ids = tq.add_rows("p", pa.record_batch({"x": pa.array(np.arange(600))}))
    produced = threading.Event()
    delivered: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def producer() -> None:
        order = np.random.default_rng(0).permutation(ids)
        for start in range(0, len(order), 25):
            part = order[start : start + 25]
            tq.put("p", part, pa.record_batch({"y": pa.array(part * 2)}))
        produced.set()

    def consumer(k: int) -> None:
        rng = random.Random(k)
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                done = produced.is_set()
                lease = tq.get("train", ["x", "y"], "p", batch_size=rng.randint(1, 9))
                if lease is None:
                    if done and tq.pending("train", ["x", "y"], "p") == 0:
                        return
                    time.sleep(0.0005)
                    continue
                got = lease.batch.to_pydict()
                assert got["y"] == [2 * v for v in got["x"]] and got["x"] == got["sample_id"]
                if rng.random() < 0.2:
                    tq.release(lease)
                else:
                    tq.ack(lease)
                    delivered[k] += lease.sample_ids.tolist()
            raise TimeoutError(f"consumer {k} did not drain the queue in time")
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=producer, daemon=True)]
    threads += [threading.Thread(target=consumer, args=(k,), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    everything = [i for chunk in delivered for i in chunk]
    assert len(everything) == len(set(everything)), "a row was delivered twice"
    assert sorted(everything) == ids.tolist(), "a row was lost"
    assert tq.stats()["leases_in_flight"] == 0
