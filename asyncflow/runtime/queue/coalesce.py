"""Merge concurrent small requests to one destination into one message.

A Dask RPC costs far more than the work behind a lease or an ack, so a process with many
consumers sends their requests together: the first request goes out at once (no added
latency for a lone consumer); requests arriving while it is in flight ride in the next
message. Each request gets its own result or its own error back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from asyncflow.errors import QueueError

Send = Callable[[list[dict]], Awaitable[list[dict]]]


class Coalescer:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._flushing = False
        self._task: asyncio.Task | None = None  # the running flush (kept so it is not collected)

    async def call(self, request: dict) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._start()
        return await future

    def defer(self, request: dict, linger: float = 0.005) -> asyncio.Future:
        """Queue a request without sending it: it rides with the next call, or goes on its
        own after `linger` seconds. For acks a consumer need not wait for (piggybacking
        them on the next get halves the round trips of a get/ack loop)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((request, future))
        loop.call_later(linger, self._start)
        return future

    def _start(self) -> None:
        if not self._flushing and self._pending:
            self._flushing = True
            self._task = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    replies = await self._send([request for request, _ in batch])
                except BaseException as exc:  # the whole message failed: every caller hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():
                        continue
                    if "error" in reply:
                        future.set_exception(QueueError(reply["error"]))
                    else:
                        future.set_result(reply.get("result"))
        finally:
            self._flushing = False


def run_each(requests: list[dict], handle: Callable[[dict], Any]) -> list[dict]:
    """Server side: answer each request on its own, so one bad request fails only itself."""
    replies = []
    for request in requests:
        try:
            replies.append({"result": handle(request)})
        except QueueError as exc:
            replies.append({"error": str(exc)})
        except Exception as exc:
            replies.append({"error": f"{type(exc).__name__}: {exc}"})
    return replies
