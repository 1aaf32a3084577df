"""OperatorHost: one replica of one operator, living on a Dask worker as an actor.

It owns the operator's state (model, optimizer) between calls and checks every
output against the operator's declared columns before it leaves the worker, so
a bad output is reported with its sample ids and never reaches the queue.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from asyncflow.errors import OperatorError
from asyncflow.operators.base import Operator, OperatorContext
from asyncflow.runtime.contracts import check_output


class OperatorHost:
    def __init__(self, operator: Operator, ctx: OperatorContext, torch_threads: int = 1):
        import torch

        # Dask's nanny sets OMP_NUM_THREADS=1; torch gets exactly what we asked for.
        torch.set_num_threads(torch_threads)
        self.operator = operator
        self.ctx = ctx
        self.busy_seconds = 0.0
        try:
            operator.setup(ctx)
        except Exception as exc:
            raise OperatorError(ctx.name, f"setup failed: {exc!r}") from exc

    def process(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, float]:
        """Run the operator on a micro-batch; returns (checked output, seconds spent)."""
        sample_ids = batch.column("sample_id").to_pylist()
        start = time.perf_counter()
        try:
            output = self.operator(batch)
        except OperatorError:
            raise
        except Exception as exc:
            raise OperatorError(self.ctx.name, f"raised {exc!r}", sample_ids) from exc
        checked = check_output(self.ctx.name, self.operator.writes, output, sample_ids)
        elapsed = time.perf_counter() - start
        self.busy_seconds += elapsed
        return checked, elapsed

    def produce(self, step: int, num_rows: int) -> pa.RecordBatch:
        return self.operator.produce(step, num_rows)  # type: ignore[attr-defined]

    def end_step(self, step: int) -> dict[str, float]:
        return self.operator.end_step(step)

    def get_weights(self) -> tuple[int, dict[str, Any]]:
        return self.operator.get_weights()  # type: ignore[attr-defined]

    def set_weights(self, version: int, weights: dict[str, Any]) -> None:
        self.operator.set_weights(version, weights)  # type: ignore[attr-defined]

    def checkpoint_state(self):
        return self.operator.checkpoint_state()  # type: ignore[attr-defined]

    def restore_state(self, tensors, meta) -> None:
        self.operator.restore_state(tensors, meta)  # type: ignore[attr-defined]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call an operator-specific method (e.g. evaluation helpers) on this replica."""
        return getattr(self.operator, method)(*args, **kwargs)
