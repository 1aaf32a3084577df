"""Ready workflows, by name: what `asyncflow run NAME` and `asyncflow graph NAME` look up."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncflow.errors import ConfigError
from asyncflow.graph import Workflow
from asyncflow.workflows.recipe import Recipe


@dataclass(frozen=True)
class WorkflowEntry:
    config_type: type
    build: Callable[[Any], Workflow]  # config -> workflow (for drawing; nothing runs)
    recipe: Callable[[Any, Path], Recipe]  # config, run dir -> everything a run needs
    summary: str


def registry() -> dict[str, WorkflowEntry]:
    from asyncflow.workflows import grpo, ppo, simulated

    def variant(advantage: str) -> type:
        """The GRPO recipe with another per-sample advantage estimator as its default."""
        return dataclasses.make_dataclass(
            f"{advantage.upper()}Config",
            [("advantage", str, dataclasses.field(default=advantage))],
            bases=(grpo.GRPOConfig,),
            frozen=True,
        )

    entries = {"grpo": WorkflowEntry(grpo.GRPOConfig, grpo.build, grpo.recipe, "GRPO")}
    for name, summary in (
        ("drgrpo", "Dr.GRPO (group mean baseline, no std)"),
        ("rloo", "RLOO (leave-one-out baseline)"),
        ("reinforce_pp", "REINFORCE++ (batch-whitened advantages)"),
    ):
        entries[name] = WorkflowEntry(variant(name), grpo.build, grpo.recipe, summary)
    entries["ppo"] = WorkflowEntry(ppo.PPOConfig, ppo.build, ppo.recipe, "PPO (critic + GAE)")
    entries["simulated"] = WorkflowEntry(
        simulated.SimConfig, simulated.build, simulated.recipe, "modelled costs (benchmarks)"
    )
    return entries


def lookup(name: str) -> WorkflowEntry:
    entries = registry()
    if name not in entries:
        raise ConfigError(f"unknown workflow {name!r}; available: {', '.join(sorted(entries))}")
    return entries[name]
