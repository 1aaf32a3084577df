"""Recipe: a workflow plus what a run needs that the graph does not describe.

The graph says who reads and writes which columns; the recipe says how many
steps, how many rows per step, how to summarise a step's rows, how to prepare
initial weights and how to evaluate the result. Executors take recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from asyncflow.graph import Workflow
from asyncflow.operators.base import Weights
from asyncflow.operators.model import ModelConfig

StepMetrics = Callable[[pa.Table], dict[str, float]]
Evaluate = Callable[[Weights], dict[str, float]]
Prepare = Callable[[], tuple[Weights, dict[str, float]]]  # -> (initial weights, info metrics)


@dataclass
class Recipe:
    workflow: Workflow
    steps: int
    rows_per_step: int  # rows the source produces per step (prompts x group size)
    micro_batch_size: int  # rows per micro-batch handed to one replica
    seed: int
    metric_columns: tuple[str, ...]  # columns `step_metrics` reads from each step's rows
    step_metrics: StepMetrics
    trainer: str  # operator whose weights are the run's result
    # the native model's config, stored in saved weights' metadata so `load_model` can
    # rebuild it; None for policies that are not native models (transformers, simulated)
    model_config: ModelConfig | None = None
    prepare: Prepare | None = None  # runs on a worker before the run: initial weights
    prepare_targets: tuple[str, ...] = ()  # operators that start from the prepared weights
    evaluate: Evaluate | None = None  # runs on a worker on initial and final weights
