"""The synchronous executor: each stage over the whole step, then the next (verl-style).

It is the honest baseline the async executor is measured against, and the mode
whose seeded runs are exactly reproducible. Per step:

    source rows -> TransferQueue -> for each operator in topological order:
        lease micro-batches of ready rows, run them on the operator's replicas
        (Dask actors) in parallel, put the checked outputs back, ack the leases
    -> trainer steps -> weight sync along the declared edges -> step metrics
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client

from asyncflow.errors import AsyncflowError, ConfigError, OperatorError
from asyncflow.graph import Node, WorkflowGraph
from asyncflow.operators.base import OperatorContext
from asyncflow.operators.model import save_weights
from asyncflow.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from asyncflow.runtime.cluster import dashboard_url, worker_addresses
from asyncflow.runtime.host import OperatorHost
from asyncflow.runtime.queue import Lease, TransferQueue, samplers
from asyncflow.runtime.report import RunReporter
from asyncflow.workflows.recipe import Recipe


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


class SyncExecutor:
    def __init__(
        self,
        recipe: Recipe,
        client: Client,
        run_dir: Path,
        *,
        reporter: RunReporter | None = None,
        torch_threads: int = 1,
        checkpoint_every: int = 0,
        resume: bool = False,
    ):
        self.recipe = recipe
        self.client = client
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.graph: WorkflowGraph = recipe.workflow.build()  # validate before anything runs
        _check_recipe(recipe, self.graph)
        self.reporter = reporter or RunReporter(self.run_dir, recipe.steps)
        self.torch_threads = torch_threads
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.queue = TransferQueue()
        self.hosts: dict[str, list[Any]] = {}
        self._token = secrets.token_hex(4)  # actor keys unique per executor, even per run dir

    # -- set-up -------------------------------------------------------------------------------

    def _run_on_cluster(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False).result()

    def _place_hosts(self) -> None:
        """One actor per replica, spread round-robin over the workers."""
        workers = itertools.cycle(worker_addresses(self.client))
        pending = {}
        for name in self.graph.order():
            node = self.graph.nodes[name]
            for replica in range(node.replicas):
                ctx = OperatorContext(
                    name=name,
                    replica=replica,
                    num_replicas=node.replicas,
                    seed=self.recipe.seed * 1000 + replica,
                    run_dir=self.run_dir,
                )
                worker = next(workers)
                pending[(name, replica)] = self.client.submit(
                    OperatorHost,
                    node.operator,
                    ctx,
                    self.torch_threads,
                    actor=True,
                    workers=[worker],
                    key=f"asyncflow-{name}-{replica}-{self._token}",
                )
        for (name, _), future in pending.items():
            self.hosts.setdefault(name, []).append(future.result())

    def _prepare_weights(self) -> None:
        """Compute initial weights on a worker and load them into every target replica."""
        t0 = time.perf_counter()
        weights, info = self._run_on_cluster(self.recipe.prepare)
        for name in self.recipe.prepare_targets:
            for host in self.hosts[name]:
                host.set_weights(0, weights).result()
        save_weights(weights, self.recipe.model_config, self.run_dir / "warmstart.safetensors")
        elapsed = time.perf_counter() - t0
        self.reporter.info(f"prepared initial weights in {elapsed:.1f}s {_fmt(info)}")

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> RunResult:
        recipe, result = self.recipe, RunResult(self.run_dir, self.recipe.steps)
        url = dashboard_url(self.client)
        if url:
            self.reporter.info(f"dashboard: {url}")
        (self.run_dir / "workflow.json").write_text(
            json.dumps(self.graph.describe(), indent=2, sort_keys=True)
        )
        self._place_hosts()
        trainer = self.hosts[recipe.trainer][0]
        first_step = 0
        if self.resume:
            first_step, result.before = self._restore()
        else:
            if recipe.prepare is not None:
                self._prepare_weights()
            if recipe.evaluate is not None:
                _, weights = trainer.get_weights().result()
                result.before = self._run_on_cluster(recipe.evaluate, weights)
                self.reporter.info(f"before training: {_fmt(result.before)}")

        for step in range(first_step, recipe.steps):
            record = self.run_step(step)
            result.history.append(record)
            self.reporter.step(record)
            if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
                self._checkpoint(step, result.before)

        _, weights = trainer.get_weights().result()
        save_weights(weights, recipe.model_config, self.run_dir / "final.safetensors")
        if recipe.evaluate is not None:
            result.after = self._run_on_cluster(recipe.evaluate, weights)
            summary = {"before": result.before, "after": result.after}
            (self.run_dir / "evaluation.json").write_text(json.dumps(summary, indent=2))
            for key in sorted(result.after, key=lambda k: k == "accuracy"):
                self.reporter.info(_before_after(key, result.before.get(key), result.after[key]))
        self.reporter.close()
        return result

    # -- checkpoints --------------------------------------------------------------------------

    def _weighted_hosts(self):
        for name in self.graph.order():
            if self.graph.nodes[name].has_weights:
                for replica, host in enumerate(self.hosts[name]):
                    yield f"{name}-{replica}", host

    def _checkpoint(self, step: int, before: dict[str, float]) -> None:
        futures = {key: host.checkpoint_state() for key, host in self._weighted_hosts()}
        states = {key: future.result() for key, future in futures.items()}
        manifest = {"next_sample_id": self.queue.next_sample_id, "before": before}
        path = save_checkpoint(self.run_dir, step, states, manifest)
        self.reporter.info(f"checkpoint: {path}")

    def _restore(self) -> tuple[int, dict[str, float]]:
        """Load the latest checkpoint into every replica; returns (next step, eval before)."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint in {self.run_dir}")
        manifest, states = load_checkpoint(path)
        hosts = dict(self._weighted_hosts())
        missing = sorted(set(hosts) - set(states))
        if missing:
            raise ConfigError(f"{path}: no state for replicas {missing}; same workflow?")
        for future in [hosts[key].restore_state(*states[key]) for key in hosts]:
            future.result()
        self.queue.start_ids_at(manifest["next_sample_id"])
        step = int(manifest["step"])
        self.reporter.truncate_after(step)
        self.reporter.info(f"resumed from {path} (step {step + 1} done)")
        return step + 1, manifest.get("before", {})

    def run_step(self, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        train_metrics: dict[str, float] = {}
        for name in self.graph.order():
            t0 = time.perf_counter()
            node = self.graph.nodes[name]
            if node.is_source:
                batch = self.hosts[name][0].produce(step, self.recipe.rows_per_step).result()
                self.queue.add_rows(step, batch)
            else:
                self._run_stage(node, step)
                # every operator hears the end of the step (trainers take their optimizer step)
                for future in [host.end_step(step) for host in self.hosts[name]]:
                    train_metrics.update(future.result())
            timings[f"time/{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        version = self._sync_weights()
        timings["time/weight_sync"] = time.perf_counter() - t0

        rows = self.queue.gather(step, list(self.recipe.metric_columns))
        self.queue.clear(step)
        elapsed = time.perf_counter() - start
        return {
            "step": step,
            "samples": rows.num_rows,
            "step_time": elapsed,
            "samples_per_s": rows.num_rows / elapsed,
            "weight_version": version,
            **self.recipe.step_metrics(rows),
            **train_metrics,
            **timings,
        }

    def _run_stage(self, node: Node, step: int) -> None:
        """Lease every ready micro-batch, run them on the replicas in parallel, store results."""
        sampler = samplers.group_preserving if node.operator.needs_whole_groups else None
        batch_size = None if sampler is not None else self.recipe.micro_batch_size
        leases: list[Lease] = []
        while True:
            lease = self.queue.get(
                node.name,
                list(node.reads),
                step,
                batch_size=batch_size,
                sampler=sampler or samplers.sequential,
            )
            if lease is None:
                break
            leases.append(lease)
        hosts = self.hosts[node.name]
        futures = [hosts[i % len(hosts)].process(lease.batch) for i, lease in enumerate(leases)]
        unacked = list(leases)
        try:
            for lease, future in zip(leases, futures, strict=True):
                output, _seconds = future.result()
                if output.num_columns:  # sinks (e.g. trainers) only consume
                    self.queue.put(step, lease.sample_ids, output, producer=node.name)
                self.queue.ack(lease)
                unacked.remove(lease)
        except AsyncflowError:
            for lease in unacked:  # give the rows back: stored data stays intact and readable
                self.queue.release(lease)
            raise
        if not leases:
            missing = list(node.reads)
            raise OperatorError(node.name, f"step {step}: no rows had its inputs {missing}")

    def _sync_weights(self) -> int:
        version = 0
        for source, target in self.graph.weight_syncs:
            version, weights = self.hosts[source][0].get_weights().result()
            for host in self.hosts[target]:
                host.set_weights(version, weights).result()
        return version


def _check_recipe(recipe: Recipe, graph: WorkflowGraph) -> None:
    problems = []
    if recipe.trainer not in graph.nodes or not graph.nodes[recipe.trainer].has_weights:
        problems.append(f"trainer {recipe.trainer!r} is not an operator with weights")
    for name in recipe.prepare_targets:
        if name not in graph.nodes or not graph.nodes[name].has_weights:
            problems.append(f"prepare target {name!r} is not an operator with weights")
    if problems:
        raise ConfigError(f"recipe for workflow {graph.name!r}: " + "; ".join(problems))


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


def _before_after(key: str, before: float | None, after: float) -> str:
    pct = key == "accuracy"

    def show(v: float | None) -> str:
        if v is None:
            return "?"
        return f"{100 * v:.1f}%" if pct else f"{v:.4g}"

    return f"held-out {key}: {show(before)} -> {show(after)}"
