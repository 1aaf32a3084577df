"""What every executor does around its steps: set-up, weights, checkpoints, the end.

`Executor` places the replicas, prepares and loads initial weights, joins
data-parallel trainers into their process group, evaluates before and after,
saves checkpoints and final weights, and tells observers. Subclasses decide how
steps run: `SyncExecutor` (here) stage by stage, `AsyncExecutor`
(streaming.py) as a pipeline with bounded staleness.

The sync executor is the honest baseline the async one is measured against,
and the mode whose seeded runs are exactly reproducible. Per step:

    source rows -> TransferQueue -> for each operator in topological order:
        lease micro-batches of ready rows, run them on the operator's replicas
        (Dask actors) in parallel, put the checked outputs back, ack the leases
    -> trainers step -> weight sync along the declared edges -> step metrics
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from asyncflow.errors import AsyncflowError, ConfigError, OperatorError
from asyncflow.graph import Node, WorkflowGraph
from asyncflow.operators.base import Operator
from asyncflow.operators.model import save_weights
from asyncflow.runtime.checkpoint import State, latest_checkpoint, load_checkpoint, save_checkpoint
from asyncflow.runtime.cluster import dashboard_url
from asyncflow.runtime.events import Dispatch, Observers, RunInfo, RunObserver
from asyncflow.runtime.queue import Lease, TransferQueue, samplers
from asyncflow.runtime.replicas import Replica, ReplicaLost, ReplicaPool
from asyncflow.runtime.report import RunReporter
from asyncflow.workflows.recipe import Recipe


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    # trainer -> step -> sample ids it trained on in that step (the exactly-once ledger)
    trained: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)


# colocate: every worker hosts a share of every operator (best when stages take turns,
# as in sync mode); disaggregate: trainers get workers of their own (best when stages run
# at the same time, as in async mode); auto: by mode.
PLACEMENTS = ("auto", "colocate", "disaggregate")


class Executor:
    """Shared set-up and tear-down; subclasses implement `_run_steps`."""

    mode = "base"

    def __init__(
        self,
        recipe: Recipe,
        client: Client,
        run_dir: Path,
        *,
        reporter: RunReporter | None = None,
        observers: list[RunObserver] | None = None,
        torch_threads: int = 1,
        checkpoint_every: int = 0,
        resume: bool = False,
        max_staleness: int = 0,
        config: dict[str, Any] | None = None,
        workflow_name: str | None = None,
        placement: str = "auto",
    ):
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.recipe = recipe
        self.client = client
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.graph: WorkflowGraph = recipe.workflow.build()  # validate before anything runs
        _check_recipe(recipe, self.graph)
        self.reporter = reporter or RunReporter(self.run_dir, recipe.steps)
        self.observers = Observers(observers)
        self.torch_threads = torch_threads
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.max_staleness = max_staleness
        self.config = config or {}
        self.workflow_name = workflow_name
        self.placement = placement
        self.queue = TransferQueue()
        self.pool = ReplicaPool(
            client,
            self.graph,
            seed=recipe.seed,
            run_dir=self.run_dir,
            torch_threads=torch_threads,
            token=secrets.token_hex(4),  # actor keys unique per executor, even per run dir
        )
        self.trainers = [
            name for name in self.graph.order() if _trains(self.graph.nodes[name].operator)
        ]
        self.sync_source = {target: source for source, target in self.graph.weight_syncs}
        # source operator -> (version, weights) that its targets should load
        self.published: dict[str, tuple[int, dict[str, Any]]] = {}
        self.initial_weights: dict[str, Any] | None = None
        # trainer -> state after its last finished step (recovery and async checkpoints)
        self.snapshots: dict[str, State] = {}
        self.step_snapshots: dict[str, dict[int, State]] = {}  # trainer -> step -> state after
        self.step_first_id: dict[int, int] = {}
        self.recoveries: list[str] = []  # what failed and how the run went on

    @property
    def hosts(self) -> dict[str, list[Any]]:
        """Operator name -> its replicas' actors (for tests and tools)."""
        return {name: [r.actor for r in rs] for name, rs in self.pool.replicas.items()}

    # -- set-up -------------------------------------------------------------------------

    def _run_on_cluster(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False).result()

    def _join_groups(self, names: list[str] | None = None) -> None:
        """Data-parallel trainers (replicas > 1) form a torch.distributed group, freshly."""
        for name in self.trainers if names is None else names:
            ranks = self.pool.replicas[name]
            if len(ranks) < 2:
                continue
            from asyncflow.runtime.data_parallel import free_address

            address = free_address()
            futures = [r.actor.join_data_parallel(address, r.index, len(ranks)) for r in ranks]
            for replica, future in zip(ranks, futures, strict=True):
                self.pool.wait(replica, future)

    def _prepare_weights(self) -> None:
        """Compute initial weights on a worker and load them into every target replica."""
        t0 = time.perf_counter()
        weights, info = self._run_on_cluster(self.recipe.prepare)
        self.initial_weights = weights
        for name in self.recipe.prepare_targets:
            replicas = self.pool.replicas[name]
            self.pool.call_all(replicas, "set_weights", 0, weights)
            for replica in replicas:
                replica.version = 0
        save_weights(weights, self.recipe.model_config, self.run_dir / "warmstart.safetensors")
        elapsed = time.perf_counter() - t0
        self.reporter.info(f"prepared initial weights in {elapsed:.1f}s {_fmt(info)}")

    def _snapshot(self, name: str, step: int | None = None) -> State:
        """Take a trainer's state after `step` (rank 0; ranks are identical), publish its
        weights, and keep it for recovery and for the checkpoint of that step."""
        tensors, meta = self.pool.call(self.pool.replicas[name][0], "checkpoint_state")
        self.snapshots[name] = (tensors, meta)
        kept = self.step_snapshots.setdefault(name, {})
        kept[step if step is not None else -1] = (tensors, meta)
        for old in sorted(kept)[: -(self.max_staleness + 3)]:
            del kept[old]
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        version = int(meta["version"])
        self.published[name] = (version, weights)
        self.observers.state_saved(name, -1 if step is None else step, tensors, meta)
        self.observers.weights_published(name, version, weights)
        return tensors, meta

    # -- the run ------------------------------------------------------------------------

    def run(self) -> RunResult:
        recipe, result = self.recipe, RunResult(self.run_dir, self.recipe.steps)
        url = dashboard_url(self.client)
        if url:
            self.reporter.info(f"dashboard: {url}")
        (self.run_dir / "workflow.json").write_text(
            json.dumps(self.graph.describe(), indent=2, sort_keys=True)
        )
        disaggregate = self.placement == "disaggregate" or (
            self.placement == "auto" and self.mode == "async"
        )
        where = self.pool.place_all(
            spread=[n for n in self.trainers if self.graph.nodes[n].replicas > 1],
            dedicated=self.trainers if disaggregate else (),
        )
        self.reporter.info(where)
        status = "failed"
        try:
            self._join_groups()
            first_step = 0
            if self.resume:
                first_step, result.before = self._restore()
            elif recipe.prepare is not None:
                self._prepare_weights()
            for name in self.trainers:
                self._snapshot(name, first_step - 1)
            self.observers.run_started(self._run_info(first_step, url))
            if not self.resume and recipe.evaluate is not None:
                _, weights = self.published[recipe.trainer]
                result.before = self._run_on_cluster(recipe.evaluate, weights)
                self.reporter.info(f"before training: {_fmt(result.before)}")

            self._run_steps(first_step, result)

            _, weights = self.published[recipe.trainer]
            save_weights(weights, recipe.model_config, self.run_dir / "final.safetensors")
            if recipe.evaluate is not None:
                result.after = self._run_on_cluster(recipe.evaluate, weights)
                summary = {"before": result.before, "after": result.after}
                (self.run_dir / "evaluation.json").write_text(json.dumps(summary, indent=2))
                for key in sorted(result.after, key=lambda k: k == "accuracy"):
                    self.reporter.info(
                        _before_after(key, result.before.get(key), result.after[key])
                    )
            status = "finished"
        finally:
            result.recoveries = list(self.recoveries)
            self.pool.close()
            self.observers.run_finished(
                {"status": status, "steps": len(result.history), "after": result.after}
            )
            self.reporter.close()
        return result

    def _run_info(self, first_step: int, url: str | None) -> RunInfo:
        return RunInfo(
            run_dir=self.run_dir,
            mode=self.mode,
            graph=self.graph,
            recipe=self.recipe,
            queue=self.queue,
            dashboard=url,
            scheduler=self.client.scheduler.address,
            max_staleness=self.max_staleness,
            first_step=first_step,
            config=self.config,
            workflow_name=self.workflow_name,
        )

    def _run_steps(self, first_step: int, result: RunResult) -> None:
        raise NotImplementedError

    def _finish_step(self, record: dict[str, Any], result: RunResult) -> None:
        result.history.append(record)
        self.reporter.step(record)
        self.observers.step_finished(record)
        step = record["step"]
        if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
            self._checkpoint(step, result.before)

    def _staleness(self, step: int, rows) -> dict[str, float]:
        """Versions behind the trainer that the step's samples were generated with."""
        if "policy_version" not in rows.column_names or not rows.num_rows:
            return {}
        trained_at = self._version_after(self.recipe.trainer, step) - 1  # before this update
        lag = trained_at - rows.column("policy_version").to_numpy()
        return {"staleness/mean": float(np.mean(lag)), "staleness/max": float(np.max(lag))}

    def _version_after(self, trainer: str, step: int) -> int:
        state = self.step_snapshots.get(trainer, {}).get(step)
        return int(state[1]["version"]) if state else self.published[trainer][0]

    # -- checkpoints --------------------------------------------------------------------

    def _checkpoint(self, step: int, before: dict[str, float]) -> None:
        """The state at the end of `step`: trainers from their snapshot of that step, their
        weight-sync targets with those weights, other weighted replicas as they are."""
        at_step = {name: kept[step] for name, kept in self.step_snapshots.items() if step in kept}
        states: dict[str, State] = {}
        pending = []
        for name in self.graph.order():
            if not self.graph.nodes[name].has_weights:
                continue
            source = self.sync_source.get(name)
            for replica in self.pool.replicas[name]:
                key = f"{name}-{replica.index}"
                if name in at_step:
                    states[key] = at_step[name]
                elif source in at_step:
                    tensors, meta = at_step[source]
                    model = {k: v for k, v in tensors.items() if k.startswith("model.")}
                    states[key] = (model, {"version": meta["version"]})
                else:
                    pending.append((key, replica, replica.actor.checkpoint_state()))
        for key, replica, future in pending:
            states[key] = self.pool.wait(replica, future)
        next_id = self.step_first_id.get(step + 1, self.queue.next_sample_id)
        manifest = {"next_sample_id": next_id, "before": before, "mode": self.mode}
        path = save_checkpoint(self.run_dir, step, states, manifest)
        self.reporter.info(f"checkpoint: {path}")

    def _restore(self) -> tuple[int, dict[str, float]]:
        """Load the latest checkpoint into every replica; returns (next step, eval before)."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint in {self.run_dir}")
        manifest, states = load_checkpoint(path)
        replicas = {
            f"{name}-{r.index}": r
            for name in self.graph.order()
            if self.graph.nodes[name].has_weights
            for r in self.pool.replicas[name]
        }
        missing = sorted(set(replicas) - set(states))
        if missing:
            raise ConfigError(f"{path}: no state for replicas {missing}; same workflow?")
        futures = [(r, r.actor.restore_state(*states[key])) for key, r in replicas.items()]
        for replica, future in futures:
            self.pool.wait(replica, future)
            replica.version = int(states[f"{replica.operator}-{replica.index}"][1]["version"])
        self.queue.start_ids_at(manifest["next_sample_id"])
        step = int(manifest["step"])
        self.reporter.truncate_after(step)
        self.reporter.info(f"resumed from {path} (step {step + 1} done)")
        return step + 1, manifest.get("before", {})

    # -- recovery -----------------------------------------------------------------------

    def _recover(self, replica: Replica, why: str) -> Replica:
        """Recreate a lost replica and give it the state it should have; tell the user."""
        new = self.pool.recreate(replica)
        name = replica.operator
        if name in self.sync_source and self.sync_source[name] in self.published:
            version, weights = self.published[self.sync_source[name]]
            self.pool.call(new, "set_weights", version, weights)
            new.version = version
        elif name in self.recipe.prepare_targets and self.initial_weights is not None:
            self.pool.call(new, "set_weights", 0, self.initial_weights)
            new.version = 0
        message = (
            f"recovered: {name} replica {replica.index} was lost with worker {replica.worker} "
            f"({why}); recreated on {new.worker}"
            + (f" with weights v{new.version}" if new.version is not None else "")
        )
        self.reporter.info(message)
        self.observers.recovered(message, name)
        self.recoveries.append(message)
        return new

    def _restore_trainer(self, name: str, why: str, step: int | None = None) -> None:
        """Put every rank of a trainer back to its state before `step` (default: its last
        snapshot), recreating lost ranks; its published weights go back with it."""
        ranks = self.pool.replicas[name]
        for i, replica in enumerate(list(ranks)):
            if not self.pool.is_live(replica):
                ranks[i] = self._recover(replica, why)
                continue  # a new actor has no half-accumulated step
            try:
                self.pool.call(replica, "discard_step")
            except ReplicaLost:  # its worker died after the liveness check
                ranks[i] = self._recover(replica, why)
        if len(ranks) > 1:
            self._join_groups([name])
        kept = self.step_snapshots.get(name, {})
        tensors, meta = self.snapshots[name] if step is None else kept[step - 1]
        self.pool.call_all(ranks, "restore_state", tensors, meta)
        for replica in ranks:
            replica.version = int(meta["version"])
        self.snapshots[name] = (tensors, meta)
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.published[name] = (int(meta["version"]), weights)


class SyncExecutor(Executor):
    mode = "sync"

    max_step_attempts = 4  # a step is redone after a worker loss, up to this many times

    def _run_steps(self, first_step: int, result: RunResult) -> None:
        for step in range(first_step, self.recipe.steps):
            for attempt in range(self.max_step_attempts):
                try:
                    record = self.run_step(step, result)
                    break
                except ReplicaLost as exc:
                    if attempt + 1 == self.max_step_attempts:
                        raise
                    self._redo_step(step, exc)
            self._finish_step(record, result)
            self.queue.clear(step)

    def _redo_step(self, step: int, lost: ReplicaLost) -> None:
        """A worker died mid-step: recreate what was lost, put every trainer back to the
        end of the previous step, and run the step again from its source rows. Leases of
        trainers are acked only after their optimizer step, so nothing is trained twice."""
        why = lost.cause or "worker gone"
        self.pool.mark_lost(lost.worker)  # before the liveness monitor's next look
        for name in self.graph.order():
            if name in self.trainers:
                continue
            replicas = self.pool.replicas[name]
            for i, replica in enumerate(list(replicas)):
                if not self.pool.is_live(replica):
                    replicas[i] = self._recover(replica, why)
        for name in self.trainers:
            self._restore_trainer(name, why, step)
        self._sync_weights()
        self.queue.clear(step)
        self.reporter.info(f"step {step + 1}: redone after losing a worker")

    def run_step(self, step: int, result: RunResult | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        train_metrics: dict[str, float] = {}
        trained: dict[str, list[int]] = {}
        for name in self.graph.order():
            t0 = time.perf_counter()
            node = self.graph.nodes[name]
            if node.is_source:
                self._add_source_rows(node, step)
            elif name in self.trainers:
                train_metrics.update(self._train_stage(node, step, trained))
            else:
                self._run_stage(node, step)
                if _has_end_step(node.operator):
                    for metrics in self.pool.call_all(self.pool.replicas[name], "end_step", step):
                        train_metrics.update(metrics)
            timings[f"time/{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        version = self._sync_weights()
        timings["time/weight_sync"] = time.perf_counter() - t0

        rows = self.queue.gather(step, list(self.recipe.metric_columns))
        if result is not None:
            for name, ids in trained.items():
                result.trained.setdefault(name, {})[step] = ids
        elapsed = time.perf_counter() - start
        return {
            "step": step,
            "samples": rows.num_rows,
            "step_time": elapsed,
            "samples_per_s": rows.num_rows / elapsed,
            "weight_version": version,
            **self.recipe.step_metrics(rows),
            **self._staleness(step, rows),
            **train_metrics,
            **timings,
        }

    def _add_source_rows(self, node: Node, step: int) -> None:
        source = self.pool.replicas[node.name][0]
        batch = self.pool.call(source, "produce", step, self.recipe.rows_per_step)
        ids = self.queue.add_rows(step, batch)
        self.step_first_id[step] = int(ids[0]) if len(ids) else self.queue.next_sample_id
        self.queue.seal(step)
        self.observers.rows_added(step, _with_ids(batch, ids))

    def _lease_all(self, node: Node, step: int) -> list[Lease | None]:
        """Every ready micro-batch of the step for `node`, in the order of its replicas.

        Data-parallel trainer ranks step together, so the slowest rank sets the pace:
        their micro-batches come from `get_group`, one lease per rank with equal token
        sums, and lease i goes to rank i % ranks (see `_dispatch`).
        """
        sampler = samplers.group_preserving if node.operator.needs_whole_groups else None
        batch_size = None if sampler is not None else self.recipe.micro_batch_size
        ranks = len(self.pool.replicas[node.name])
        data_parallel = ranks > 1 and _trains(node.operator)
        leases: list[Lease] = []
        while True:
            if data_parallel:
                group = self.queue.get_group(
                    node.name,
                    list(node.reads),
                    step,
                    ranks=ranks,
                    batch_size=None if batch_size is None else batch_size * ranks,
                    sampler=sampler or samplers.sequential,
                )
                if not group:
                    break
                leases.extend(group + [None] * (ranks - len(group)))  # keep rank alignment
                continue
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
        if not any(leases):
            missing = list(node.reads)
            raise OperatorError(node.name, f"step {step}: no rows had its inputs {missing}")
        return leases

    def _dispatch(
        self, node: Node, step: int, leases: list[Lease | None]
    ) -> list[tuple[Lease, Any]]:
        """Run the leases on the replicas in parallel (lease i on replica i % replicas;
        None leaves that replica out of a round); returns (lease, output) in order."""
        replicas = self.pool.replicas[node.name]
        sent = []
        for i, lease in enumerate(leases):
            if lease is None:
                continue
            replica = replicas[i % len(replicas)]
            sent.append(
                (lease, replica, time.time(), self.pool.submit(replica, "process", lease.batch))
            )
        done = []
        for lease, replica, started, future in sent:
            output, busy = self.pool.wait(replica, future)
            self.observers.dispatched(
                Dispatch(
                    node.name,
                    replica.index,
                    replica.worker,
                    step,
                    lease.sample_ids,
                    lease.batch,
                    output,
                    started,
                    time.time(),
                    busy,
                    replica.version,
                )
            )
            done.append((lease, output))
        return done

    def _run_stage(self, node: Node, step: int) -> None:
        """Lease every ready micro-batch, run them on the replicas in parallel, store results."""
        leases = self._lease_all(node, step)
        unacked = [lease for lease in leases if lease is not None]
        try:
            for lease, output in self._dispatch(node, step, leases):
                if output.num_columns:  # sinks only consume
                    self.queue.put(step, lease.sample_ids, output, producer=node.name)
                self.queue.ack(lease)
                unacked.remove(lease)
        except AsyncflowError:
            for lease in unacked:  # give the rows back: stored data stays intact and readable
                self.queue.release(lease)
            raise

    def _train_stage(self, node: Node, step: int, trained: dict[str, list[int]]) -> dict:
        """Like a stage, but the leases are acked only once the optimizer stepped."""
        placed = self._lease_all(node, step)
        leases = [lease for lease in placed if lease is not None]
        try:
            self._dispatch(node, step, placed)
            metrics: dict[str, float] = {}
            for replica, m in zip(
                self.pool.replicas[node.name],
                self.pool.call_all(self.pool.replicas[node.name], "end_step", step),
                strict=True,
            ):
                self.observers.step_ended(node.name, replica.index, step, m)
                metrics.update(m)
        except AsyncflowError:
            for lease in leases:
                self.queue.release(lease)
            raise
        for lease in leases:
            self.queue.ack(lease)
        trained[node.name] = sorted(int(i) for lease in leases for i in lease.sample_ids)
        self._snapshot(node.name, step)
        return metrics

    def _sync_weights(self) -> int:
        for source, target in self.graph.weight_syncs:
            version, weights = self.published[source]
            replicas = self.pool.replicas[target]
            self.pool.call_all(replicas, "set_weights", version, weights)
            for replica in replicas:
                replica.version = version
                self.observers.weights_loaded(target, replica.index, version)
        return self.published[self.recipe.trainer][0]


def _trains(operator: Operator) -> bool:
    return bool(getattr(operator, "trains", False)) and bool(getattr(operator, "has_weights", 0))


def _has_end_step(operator: Operator) -> bool:
    return type(operator).end_step is not Operator.end_step


def _with_ids(batch, ids):
    import pyarrow as pa

    return batch.append_column("sample_id", pa.array(np.asarray(ids), pa.int64()))


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
