"""The operator protocol: declare columns, set up once per replica, map micro-batches.

An operator object is a light, picklable description (config only). The runtime
ships it to a Dask worker, calls `setup` there once per replica, then feeds it
Arrow micro-batches. The graph layer reads only `reads`, `writes`, `is_source`
and `has_weights`, so no algorithm is special-cased anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import pyarrow as pa

ColumnTypes = Mapping[str, str | None]
Weights = dict[str, Any]  # parameter name -> torch.Tensor


@dataclass(frozen=True)
class OperatorContext:
    """What a replica knows about where it runs; handed to `setup`."""

    name: str
    replica: int = 0
    num_replicas: int = 1
    seed: int = 0
    run_dir: Path | None = None
    worker: str = "local"
    extra: dict[str, Any] = field(default_factory=dict)
    run_seed: int = 0  # the run's seed (recipe.seed), the same on every replica


class Operator:
    """Maps a micro-batch of rows (the declared `reads` columns) to new columns (`writes`)."""

    # Class-level declarations (read-only mappings); operators whose columns depend on
    # configuration assign instance attributes in __init__ instead.
    reads: ColumnTypes = MappingProxyType({})
    writes: ColumnTypes = MappingProxyType({})
    is_source: ClassVar[bool] = False
    has_weights: ClassVar[bool] = False
    needs_whole_groups: ClassVar[bool] = False  # batches must hold complete `group_id` groups

    def setup(self, ctx: OperatorContext) -> None:
        """Build heavy state (models, optimizers) on the worker; default keeps the context."""
        self.ctx = ctx

    @property
    def operator_name(self) -> str:
        """The workflow node's name once set up (errors name it); the class name before."""
        ctx = getattr(self, "ctx", None)
        return ctx.name if ctx is not None else type(self).__name__

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch | Mapping[str, pa.Array]:
        raise NotImplementedError

    def end_step(self, step: int) -> dict[str, float]:
        """Called once per global step after every micro-batch of that step; returns metrics."""
        return {}


class SourceOperator(Operator):
    """Produces the rows of each step (e.g. prompts, already expanded per group)."""

    is_source: ClassVar[bool] = True

    def produce(self, step: int, num_rows: int) -> pa.RecordBatch:
        raise NotImplementedError


class WeightedOperator(Operator):
    """Holds model weights it can publish (trainer) or load (rollout, reference)."""

    has_weights: ClassVar[bool] = True

    def get_weights(self) -> tuple[int, Weights]:
        raise NotImplementedError

    def set_weights(self, version: int, weights: Weights) -> None:
        raise NotImplementedError
