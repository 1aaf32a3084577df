"""Coalescer: concurrent requests share messages; each caller gets its own result or error."""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.errors import QueueError
from asyncflow.runtime.queue.coalesce import Coalescer, run_each


def test_concurrent_calls_share_messages_and_keep_their_own_results():
    messages: list[list[dict]] = []

    async def send(requests):
        messages.append(requests)
        await asyncio.sleep(0.01)  # a round trip: later callers queue up meanwhile
        return run_each(requests, lambda r: r["x"] * 10 if r["x"] != 3 else _fail())

    async def main():
        c = Coalescer(send)
        first = asyncio.ensure_future(c.call({"x": 0}))
        await asyncio.sleep(0.001)  # the first message is in flight
        rest = [c.call({"x": i}) for i in range(1, 6)]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50]
    assert isinstance(results[3], QueueError) and "bad request 3" in str(results[3])
    assert len(messages) == 2  # the first call alone, then everything that arrived meanwhile
    assert [r["x"] for r in messages[0]] == [0]
    assert [r["x"] for r in messages[1]] == [1, 2, 3, 4, 5]


def _fail():
    raise QueueError("bad request 3")


def test_a_failed_message_fails_every_caller_in_it():
    async def send(requests):
        raise OSError("connection lost")

    async def main():
        c = Coalescer(send)
        return await asyncio.gather(c.call({}), c.call({}), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, OSError) for r in results)


def test_run_each_wraps_unexpected_errors_with_their_type():
    replies = run_each([{"a": 1}, {}], lambda r: r["a"])
    assert replies[0] == {"result": 1}
    assert replies[1]["error"].startswith("KeyError")


def test_calls_after_a_flush_start_a_new_message():
    sent = []

    async def send(requests):
        sent.append(len(requests))
        return [{"result": None} for _ in requests]

    async def main():
        c = Coalescer(send)
        await c.call({})
        await c.call({})

    asyncio.run(main())
    assert sent == [1, 1]
    with pytest.raises(TypeError):
        Coalescer()  # type: ignore[call-arg]


def test_deferred_requests_ride_with_the_next_call_or_go_alone():
    sent: list[list[dict]] = []

    async def send(requests):
        sent.append(requests)
        return [{"result": r["x"]} for r in requests]

    async def main():
        c = Coalescer(send)
        acked = c.defer({"x": "ack"})
        got = await c.call({"x": "get"})  # one message: the deferred ack first, then the get
        assert got == "get" and await acked == "ack"
        alone = c.defer({"x": "late ack"}, linger=0.01)
        assert await alone == "late ack"  # nobody called: it went on its own

    asyncio.run(main())
    assert [[r["x"] for r in m] for m in sent] == [["ack", "get"], ["late ack"]]
