"""OperatorHost: one replica of one operator, living on a Dask worker as an actor.

It owns the operator's state (model, optimizer) between calls and checks every
output against the operator's declared columns before it leaves the worker, so
a bad output is reported with its sample ids and never reaches the queue.

Plain actor methods on one Dask worker all share a single thread, so two
replicas placed on the same worker (a rollout and a trainer, or 32 simulated
replicas) would run one after the other. Every method here is `async` and runs
the operator on the replica's own thread instead: replicas run concurrently,
while each replica still sees its calls one at a time and in order (a weight
load never lands in the middle of a generation).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from asyncflow.errors import OperatorError
from asyncflow.operators.base import Operator, OperatorContext
from asyncflow.runtime.contracts import check_output


class OperatorHost:
    def __init__(self, operator: Operator, ctx: OperatorContext, torch_threads: int = 1):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"asyncflow-{ctx.name}")
        self.operator = operator
        self.ctx = ctx
        self.busy_seconds = 0.0
        self.calls = 0
        self._thread.submit(self._setup, torch_threads).result()

    def _setup(self, torch_threads: int) -> None:
        import torch

        # Dask's nanny sets OMP_NUM_THREADS=1; torch gets exactly what we asked for.
        torch.set_num_threads(torch_threads)
        try:
            self.operator.setup(self.ctx)
        except Exception as exc:
            raise OperatorError(self.ctx.name, f"setup failed: {exc!r}") from exc

    async def _on_thread(self, fn, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def process(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, float]:
        """Run the operator on a micro-batch; returns (checked output, seconds spent)."""
        return await self._on_thread(self._process, batch)

    def _process(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, float]:
        # per-operator time for the dashboard's Fine Performance Metrics (observe/spans.py)
        from asyncflow.runtime.observe.spans import meter

        sample_ids = batch.column("sample_id").to_pylist()
        start = time.perf_counter()
        cpu_start = time.thread_time()
        try:
            output = self.operator(batch)
        except OperatorError:
            raise
        except Exception as exc:
            raise OperatorError(self.ctx.name, f"raised {exc!r}", sample_ids) from exc
        checked = check_output(self.ctx.name, self.operator.writes, output, sample_ids)
        elapsed = time.perf_counter() - start
        meter(self.ctx.name, elapsed, time.thread_time() - cpu_start)
        self.busy_seconds += elapsed
        self.calls += 1
        return checked, elapsed

    async def produce(self, step: int, num_rows: int) -> pa.RecordBatch:
        return await self._on_thread(self.operator.produce, step, num_rows)  # type: ignore[attr-defined]

    async def end_step(self, step: int) -> dict[str, float]:
        return await self._on_thread(self.operator.end_step, step)

    async def get_weights(self) -> tuple[int, dict[str, Any]]:
        return await self._on_thread(self.operator.get_weights)  # type: ignore[attr-defined]

    async def set_weights(self, version: int, weights: dict[str, Any]) -> None:
        await self._on_thread(self.operator.set_weights, version, weights)  # type: ignore[attr-defined]

    async def checkpoint_state(self):
        return await self._on_thread(self.operator.checkpoint_state)  # type: ignore[attr-defined]

    async def restore_state(self, tensors, meta) -> None:
        await self._on_thread(self.operator.restore_state, tensors, meta)  # type: ignore[attr-defined]

    async def discard_step(self) -> None:
        """Forget a half-accumulated step (its rows will be redelivered after a failure)."""
        reset = getattr(self.operator, "discard_step", None)
        if reset is not None:
            await self._on_thread(reset)

    async def join_data_parallel(self, address: str, rank: int, world_size: int) -> None:
        """Become rank `rank` of the trainer's process group (gloo on CPU, NCCL on GPU)."""
        from asyncflow.runtime import data_parallel

        await self._on_thread(data_parallel.join, address, rank, world_size)

    async def stats(self) -> dict[str, float]:
        return {"busy_seconds": self.busy_seconds, "calls": float(self.calls)}

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call an operator-specific method (e.g. evaluation helpers) on this replica."""
        fn = getattr(self.operator, method)
        return await self._on_thread(lambda: fn(*args, **kwargs))
