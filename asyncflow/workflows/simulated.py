"""A cluster-scale RL step with modelled costs, run on the real runtime.

The operators here do no arithmetic worth the name: each one *sleeps* for the time
its work would take on a real cluster, given the rows it was handed. Everything
else is real: the executors (sync and async), the TransferQueue, the Dask actors
(one per replica; many replicas share a worker process, each on its own thread,
and a sleep releases the GIL), leases, weight sync and bounded staleness. So a run
measures what the runtime adds to (or saves from) a workload whose cost is known
exactly, and the bottleneck-stage bound below is exact for the rows actually drawn.

    prompts -> rollout (R replicas) -> ref (optional), reward -> actor ~> rollout (weights)

`asyncflow run simulated --mode async` runs it; `benchmarks/async_vs_sync.py` measures it.

The cost model (`CostModel`; seconds, tokens):

- response lengths are long-tailed: `median * exp(p + s)`, rounded and clipped to
  [min_response, max_response], with a per-prompt effect p ~ N(0, prompt_sigma) shared
  by the `group_size` samples of a prompt (hard prompts get long answers) and a
  per-sample s ~ N(0, sample_sigma); drawn from (seed, step), so both modes see the
  same rows;
- rollout, per micro-batch: `gen_call_s + gen_token_s * max(response lengths)`:
  batched decoding runs until the longest sequence of the batch ends;
- ref (a forward pass), per micro-batch: `ref_token_s * (prompt + response tokens)`;
- reward (a verifier), per micro-batch: `reward_sample_s * rows`;
- actor: `train_token_s * tokens / train_workers` per micro-batch (the one trainer
  replica stands for a data-parallel group of `train_workers` virtual workers that
  scales perfectly), plus `train_step_s` per optimizer step (`end_step`).

Every cost except the rollout's is linear in rows or tokens (no per-call constant), so
a stage's total work does not depend on how the runtime cuts micro-batches; rollout
micro-batches are consecutive `micro_batch_size` rows of a step in both modes (all of a
step's prompts are ready at once and the sampler takes the oldest rows), so its total
is fixed too. Hence `stage_work` is exact and `bottleneck_bound` is what a perfect
pipeline with no runtime overhead would reach. `sync_step_model` and
`async_schedule_model` give what each executor's own schedule would reach with no
overhead, which splits a measured gap into schedule and runtime costs.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from asyncflow.graph import Workflow
from asyncflow.operators.base import Operator, OperatorContext, SourceOperator, WeightedOperator
from asyncflow.workflows.recipe import Recipe

STAGES = ("rollout", "ref", "reward", "actor")


@dataclass(frozen=True)
class CostModel:
    prompt_tokens: int = 256
    median_response: float = 400.0  # tokens
    prompt_sigma: float = 0.5  # log-length spread between prompts
    sample_sigma: float = 0.7  # log-length spread between samples of one prompt
    min_response: int = 16
    max_response: int = 4096
    gen_call_s: float = 0.05  # per rollout micro-batch: prefill, launch
    gen_token_s: float = 3e-4  # per decoding step of a micro-batch (its longest response)
    ref_token_s: float = 3e-6  # per token of a ref forward pass on one ref replica
    reward_sample_s: float = 0.001  # per sample on one reward replica
    train_token_s: float = 2e-5  # per token on one virtual trainer worker
    train_step_s: float = 0.05  # per optimizer step

    def scaled(self, factor: float) -> CostModel:
        """The same workload with every cost `factor` times longer (fewer calls per second)."""
        seconds = {
            f.name: getattr(self, f.name) * factor for f in fields(self) if f.name[-2:] == "_s"
        }
        return replace(self, **seconds)

    def rollout_seconds(self, lengths: np.ndarray) -> float:
        return self.gen_call_s + self.gen_token_s * float(np.max(lengths)) if len(lengths) else 0.0

    def ref_seconds(self, lengths: np.ndarray) -> float:
        return self.ref_token_s * float(np.sum(lengths + self.prompt_tokens))

    def reward_seconds(self, rows: int) -> float:
        return self.reward_sample_s * rows

    def train_seconds(self, lengths: np.ndarray, train_workers: int) -> float:
        return self.train_token_s * float(np.sum(lengths + self.prompt_tokens)) / train_workers


@dataclass(frozen=True)
class SimConfig:
    steps: int = 12
    groups_per_step: int = 128  # prompts per step (4 micro-batches per rollout replica)
    group_size: int = 8  # samples per prompt
    micro_batch_size: int = 8  # rows per micro-batch (rollout, ref, reward)
    rollout_replicas: int = 32
    ref_replicas: int = 8  # 0: no reference stage
    reward_replicas: int = 8
    train_workers: int = 16  # virtual data-parallel workers behind the one trainer replica
    seed: int = 0
    cost: CostModel = field(default_factory=CostModel)

    @property
    def rows_per_step(self) -> int:
        return self.groups_per_step * self.group_size

    def replicas(self, stage: str) -> int:
        return {
            "rollout": self.rollout_replicas,
            "ref": self.ref_replicas,
            "reward": self.reward_replicas,
            "actor": 1,
        }[stage]

    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if self.replicas(s) > 0)


# -- the model, as plain functions (the operators and the bound share them) ---------------


def response_lengths(cfg: SimConfig, step: int, groups: int | None = None) -> np.ndarray:
    """Modelled response lengths of a step's rows (int64, group after group)."""
    c = cfg.cost
    groups = cfg.groups_per_step if groups is None else groups
    rng = np.random.default_rng([cfg.seed, step])
    per_prompt = rng.normal(0.0, c.prompt_sigma, size=(groups, 1))
    per_sample = rng.normal(0.0, c.sample_sigma, size=(groups, cfg.group_size))
    raw = np.rint(c.median_response * np.exp(per_prompt + per_sample)).reshape(-1)
    return np.clip(raw, c.min_response, c.max_response).astype(np.int64)


def micro_batches(values: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive chunks of `size` rows (the last may be shorter)."""
    return [values[i : i + size] for i in range(0, len(values), size)]


def stage_work(cfg: SimConfig, lengths: np.ndarray) -> dict[str, float]:
    """Modelled seconds of work of one step per stage (summed over its micro-batches)."""
    c, chunks = cfg.cost, micro_batches(lengths, cfg.micro_batch_size)
    work = {
        "rollout": sum(c.rollout_seconds(m) for m in chunks),
        "ref": c.ref_seconds(lengths) if cfg.ref_replicas else 0.0,
        "reward": c.reward_seconds(len(lengths)),
        "actor": c.train_seconds(lengths, cfg.train_workers) + c.train_step_s,
    }
    return {s: work[s] for s in cfg.stages()}


def sync_step_model(cfg: SimConfig, lengths: np.ndarray) -> dict[str, float]:
    """Modelled seconds of each stage of a synchronous step with no runtime overhead.

    The sync executor sends micro-batch i to replica i % replicas and waits for the last:
    a stage takes its busiest replica's sum. The trainer gets the whole step at once."""
    c, chunks = cfg.cost, micro_batches(lengths, cfg.micro_batch_size)

    def makespan(costs: list[float], replicas: int) -> float:
        return max(sum(costs[r::replicas]) for r in range(replicas))

    model = {
        "rollout": makespan([c.rollout_seconds(m) for m in chunks], cfg.rollout_replicas),
        "ref": makespan([c.ref_seconds(m) for m in chunks], cfg.ref_replicas)
        if cfg.ref_replicas
        else 0.0,
        "reward": makespan([c.reward_seconds(len(m)) for m in chunks], cfg.reward_replicas),
        "actor": c.train_seconds(lengths, cfg.train_workers) + c.train_step_s,
    }
    model = {s: model[s] for s in cfg.stages()}
    model["total"] = sum(model.values())
    return model


def bottleneck_bound(cfg: SimConfig, steps: list[int] | range) -> dict[str, Any]:
    """The throughput no schedule can beat over `steps`, with no runtime overhead.

    Stage s needs W_s seconds of work over those steps on r_s replicas, so it can pass at
    most capacity_s = samples * r_s / W_s samples per second (= r_s / mean seconds per
    sample); the pipeline passes at most min_s capacity_s: the bottleneck stage's."""
    work = {s: 0.0 for s in cfg.stages()}
    samples = 0
    for step in steps:
        lengths = response_lengths(cfg, step)
        samples += len(lengths)
        for s, w in stage_work(cfg, lengths).items():
            work[s] += w
    capacity = {s: samples * cfg.replicas(s) / w for s, w in work.items()}
    bottleneck = min(capacity, key=capacity.__getitem__)
    return {
        "samples": samples,
        "work_seconds": work,
        "capacity": capacity,
        "bottleneck": bottleneck,
        "samples_per_s": capacity[bottleneck],
    }


def async_schedule_model(cfg: SimConfig, steps: list[int] | range, max_staleness: int) -> dict:
    """When each step would finish under the async executor's policy with zero overhead.

    A discrete-event model of `AsyncExecutor`'s rules, for attributing the gap between
    a measured run and `bottleneck_bound`: step k's rows enter once the trainer finished
    step k - max_staleness - 1; every idle replica takes the oldest ready micro-batch
    (a rollout micro-batch only of a step within the staleness bound); ref and reward take
    a rollout micro-batch once it is done; the trainer takes every ready micro-batch of
    the step it is on, and steps the optimizer (`train_step_s`) once the step's rows are
    all trained. Calls, leases, weight loads and wake-ups cost nothing here.
    Returns {step: finish time in seconds from the start}."""
    if cfg.micro_batch_size % cfg.group_size:
        raise ValueError("the schedule model needs micro-batches of whole groups")
    c, steps = cfg.cost, list(steps)
    chunks = {k: micro_batches(response_lengths(cfg, k), cfg.micro_batch_size) for k in steps}
    scorers = [s for s in ("ref", "reward") if cfg.replicas(s)]
    free = {s: cfg.replicas(s) for s in ("rollout", *scorers)}
    waiting: dict[str, list[tuple[int, int]]] = {s: [] for s in ("rollout", *scorers)}
    scored: dict[tuple[int, int], int] = {}  # micro-batch -> scorers done with it
    ready: dict[int, list[int]] = {k: [] for k in steps}  # step -> micro-batches to train
    untrained = {k: len(chunks[k]) for k in steps}
    added: set[int] = set()
    trainer = {"step": steps[0] if steps else 0, "busy": False}
    finish: dict[int, float] = {}
    events: list[tuple[float, int, str, Any]] = []
    now, order = 0.0, 0

    def at(when: float, kind: str, data: Any) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (when, order, kind, data))

    def cost(stage: str, lengths: np.ndarray) -> float:
        if stage == "rollout":
            return c.rollout_seconds(lengths)
        return c.ref_seconds(lengths) if stage == "ref" else c.reward_seconds(len(lengths))

    def dispatch() -> None:
        through = trainer["step"] + max_staleness
        for k in steps:
            if k <= through and k not in added:
                added.add(k)
                waiting["rollout"].extend((k, i) for i in range(len(chunks[k])))
        for stage, queue in waiting.items():
            queue.sort()
            while free[stage] and queue and (stage != "rollout" or queue[0][0] <= through):
                k, i = queue.pop(0)
                free[stage] -= 1
                at(now + cost(stage, chunks[k][i]), stage, (k, i))
        k = trainer["step"]
        if trainer["busy"] or k not in chunks:
            return
        if ready[k]:
            lengths = np.concatenate([chunks[k][i] for i in ready[k]])
            at(now + c.train_seconds(lengths, cfg.train_workers), "train", (k, len(ready[k])))
            ready[k] = []
            trainer["busy"] = True
        elif untrained[k] == 0:
            at(now + c.train_step_s, "end_step", k)
            trainer["busy"] = True

    dispatch()
    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "rollout":
            free["rollout"] += 1
            waiting.update({s: [*waiting[s], data] for s in scorers})
        elif kind in ("ref", "reward"):
            free[kind] += 1
            scored[data] = scored.get(data, 0) + 1
            if scored[data] == len(scorers):
                ready[data[0]].append(data[1])
        elif kind == "train":
            trainer["busy"] = False
            untrained[data[0]] -= data[1]
        else:  # end_step
            trainer["busy"] = False
            finish[data] = now
            trainer["step"] = data + 1
        dispatch()
    return finish


# -- operators ----------------------------------------------------------------------------


def spend(seconds: float) -> None:
    """Time passes as the model says; a sleep releases the GIL, so replicas overlap."""
    if seconds > 0:
        time.sleep(seconds)


class SimPrompts(SourceOperator):
    """A step's prompts, `group_size` rows each, with their modelled response lengths."""

    writes: ClassVar = {"group_id": "int64", "prompt_len": "int64", "target_len": "int64"}

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg

    def produce(self, step: int, num_rows: int) -> pa.RecordBatch:
        groups = num_rows // self.cfg.group_size
        lengths = response_lengths(self.cfg, step, groups)
        group_ids = step * groups + np.arange(len(lengths)) // self.cfg.group_size
        return pa.record_batch(
            {
                "group_id": pa.array(group_ids, pa.int64()),
                "prompt_len": pa.array(np.full(len(lengths), self.cfg.cost.prompt_tokens)),
                "target_len": pa.array(lengths, pa.int64()),
            }
        )


class _Versioned(WeightedOperator):
    """A weight holder of one tiny tensor; `version` counts optimizer steps."""

    def setup(self, ctx: OperatorContext) -> None:
        import torch

        self.ctx = ctx
        self.version = 0
        self.weights = {"w": torch.zeros(2)}

    def get_weights(self):
        return self.version, {k: v.clone() for k, v in self.weights.items()}

    def set_weights(self, version: int, weights) -> None:
        self.weights = {k: v.clone() for k, v in weights.items()}
        self.version = int(version)

    def checkpoint_state(self):
        version, weights = self.get_weights()
        return {f"model.{k}": v for k, v in weights.items()}, {"version": version}

    def restore_state(self, tensors, meta) -> None:
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.set_weights(int(meta["version"]), weights)


class SimRollout(_Versioned):
    """Generation: the micro-batch takes as long as its longest response."""

    reads: ClassVar = {"prompt_len": "int64", "target_len": "int64"}
    writes: ClassVar = {"response_len": "int64", "policy_version": "int64"}

    def __init__(self, cost: CostModel):
        self.cost = cost

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        lengths = batch.column("target_len").to_numpy()
        spend(self.cost.rollout_seconds(lengths))
        return {
            "response_len": pa.array(lengths, pa.int64()),
            "policy_version": pa.array(np.full(len(lengths), self.version), pa.int64()),
        }


class SimRef(Operator):
    """A frozen model's forward pass: time per token."""

    reads: ClassVar = {"prompt_len": "int64", "response_len": "int64"}
    writes: ClassVar = {"ref_logprob": "float32"}

    def __init__(self, cost: CostModel):
        self.cost = cost

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        lengths = batch.column("response_len").to_numpy()
        spend(self.cost.ref_seconds(lengths))
        return {"ref_logprob": pa.array(-0.01 * lengths.astype(np.float32), pa.float32())}


class SimReward(Operator):
    """A verifier: time per sample. The reward itself is a stand-in (shorter is better)."""

    reads: ClassVar = {"response_len": "int64"}
    writes: ClassVar = {"reward": "float32"}

    def __init__(self, cost: CostModel):
        self.cost = cost

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        lengths = batch.column("response_len").to_numpy()
        spend(self.cost.reward_seconds(len(lengths)))
        reward = 1.0 - lengths.astype(np.float32) / np.float32(self.cost.max_response)
        return {"reward": pa.array(reward, pa.float32())}


class SimTrainer(_Versioned):
    """The trainer: time per token of every micro-batch, plus an optimizer step per step.

    Takes whole groups (as a GRPO actor would), so the runtime hands it every complete
    group that is ready: few calls per step, whatever the micro-batch size."""

    trains: ClassVar[bool] = True
    needs_whole_groups: ClassVar[bool] = True

    def __init__(self, cost: CostModel, train_workers: int, with_ref: bool):
        self.cost = cost
        self.train_workers = train_workers
        self.reads = {
            "group_id": "int64",
            "prompt_len": "int64",
            "response_len": "int64",
            "reward": "float32",
            "policy_version": "int64",
        }
        if with_ref:
            self.reads["ref_logprob"] = "float32"
        self.writes = {}

    def setup(self, ctx: OperatorContext) -> None:
        super().setup(ctx)
        self.discard_step()

    def discard_step(self) -> None:
        self._rows = 0
        self._tokens = 0
        self._calls = 0

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        lengths = batch.column("response_len").to_numpy()
        spend(self.cost.train_seconds(lengths, self.train_workers))
        self._rows += len(lengths)
        self._tokens += int(np.sum(lengths + self.cost.prompt_tokens))
        self._calls += 1
        return {}

    def end_step(self, step: int) -> dict[str, float]:
        spend(self.cost.train_step_s)
        self.version += 1
        self.weights["w"][0] = float(self.version)
        metrics = {
            "actor/rows": float(self._rows),
            "actor/tokens": float(self._tokens),
            "actor/calls": float(self._calls),
        }
        self.discard_step()
        return metrics


# -- the recipe ---------------------------------------------------------------------------


def build(cfg: SimConfig) -> Workflow:
    wf = Workflow("simulated", description="modelled costs: long-tail rollout, RL step")
    wf.add("prompts", SimPrompts(cfg))
    wf.add("rollout", SimRollout(cfg.cost), replicas=cfg.rollout_replicas)
    if cfg.ref_replicas:
        wf.add("ref", SimRef(cfg.cost), replicas=cfg.ref_replicas)
    wf.add("reward", SimReward(cfg.cost), replicas=cfg.reward_replicas)
    wf.add("actor", SimTrainer(cfg.cost, cfg.train_workers, with_ref=cfg.ref_replicas > 0))
    wf.sync_weights("actor", to=["rollout"])
    return wf


def step_metrics(rows: pa.Table) -> dict[str, float]:
    lengths = rows.column("response_len").to_numpy()
    return {
        "reward": float(np.mean(rows.column("reward").to_numpy())),
        "response_len": float(np.mean(lengths)),
        "response_len/max": float(np.max(lengths)),
    }


def recipe(cfg: SimConfig, run_dir: Path | None = None) -> Recipe:
    return Recipe(
        workflow=build(cfg),
        steps=cfg.steps,
        rows_per_step=cfg.rows_per_step,
        micro_batch_size=cfg.micro_batch_size,
        seed=cfg.seed,
        metric_columns=("reward", "response_len", "policy_version"),
        step_metrics=step_metrics,
        trainer="actor",
        prepare=None,
        evaluate=None,
    )
