"""What every model-holding operator shares: building the model, publishing weights, and
the trainers' exact micro-batch accumulation with an optimizer and an LR schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from asyncflow.errors import OperatorError
from asyncflow.operators.base import OperatorContext, WeightedOperator, Weights

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # AdamW learning rate (the peak, under a schedule)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: str = "constant"  # "constant" or "cosine" (after the warmup)
    warmup_steps: int = 0  # linear warmup over this many optimizer steps
    total_steps: int | None = None  # where cosine reaches min_lr_ratio; needed for "cosine"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.schedule!r}; choose one of {LR_SCHEDULES}")
        if self.schedule == "cosine" and not self.total_steps:
            raise ValueError("the cosine LR schedule needs total_steps (optimizer steps)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


DEFAULT_OPTIM = OptimConfig()


def lr_factor(cfg: OptimConfig, step: int) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (0-based).

    warmup (step < W): (step + 1) / W, so the first step already moves;
    constant: 1 afterwards; cosine: m + (1 - m) * (1 + cos(pi * p)) / 2 with
    p = (step - W) / (total_steps - W) clamped to [0, 1] and m = min_lr_ratio.
    """
    W = cfg.warmup_steps
    if step < W:
        return (step + 1) / W
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.total_steps - W, 1)
    progress = min(max((step - W) / span, 0.0), 1.0)
    m = cfg.min_lr_ratio
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))


class ModelOperator(WeightedOperator):
    """Holds one model built from a spec (`build(seed)`) on the worker; publishes and
    loads its weights. Subclasses set `self.model_spec` in __init__."""

    model_spec: Any
    trains: ClassVar[bool] = False  # trainers keep the model in train mode

    def setup(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.model = self.model_spec.build(seed=ctx.seed)
        self.model.train(self.trains)
        self.version = 0

    def get_weights(self) -> tuple[int, Weights]:
        return self.version, {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, version: int, weights: Weights) -> None:
        self.model.load_state_dict(weights)
        self.version = version

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able facts) that restore this replica exactly: no pickle needed."""
        version, weights = self.get_weights()
        return {f"model.{k}": v for k, v in weights.items()}, {"version": version}

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.set_weights(int(meta["version"]), weights)


class AccumulatingTrainer(ModelOperator):
    """Micro-batch training whose update equals the one-big-batch update.

    `__call__` computes a loss *numerator* and its denominator (tokens or rows, from
    `losses.aggregate_terms`) and hands them to `_accumulate`, which back-propagates
    the numerator. `end_step` divides the summed gradients by the step's summed
    denominator, clips, steps AdamW and the LR schedule. So streaming micro-batches
    of any size or token count gives exactly the update of one batch, and no global
    batch size is needed up front.

    Data parallel (`ctx.num_replicas > 1`, every rank in one torch.distributed group,
    see `asyncflow.runtime.data_parallel`): `end_step` first sums the ranks' gradient
    numerators and counters, so the division, clipping and AdamW step are those of one
    batch holding every rank's rows, taken identically on every rank (the weights stay
    bit-identical). Rows may be split over the ranks in any way, none at all included.
    """

    trains: ClassVar[bool] = True
    metric_prefix: ClassVar[str] = "train"
    loss_metric: ClassVar[str] = "loss"  # the reported loss: sum of numerators / denominator
    optim: OptimConfig

    def setup(self, ctx: OperatorContext) -> None:
        super().setup(ctx)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=self.optim.betas,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, self.optim)
        )
        self._reset_step()

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().checkpoint_state()
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().clone()
        meta["param_groups"] = optim["param_groups"]
        meta["scheduler"] = {
            k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
        }
        return tensors, meta

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().restore_state(tensors, meta)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None]})

    def _reset_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._rows = 0
        self._tokens = 0.0
        self._denominator = 0.0
        self._loss_sum = 0.0
        self._token_sums: dict[str, float] = {}  # metric -> sum over real tokens

    def _accumulate(
        self,
        numerator: torch.Tensor,
        denominator: float,
        reported_loss: torch.Tensor,
        *,
        rows: int,
        mask: torch.Tensor,
        token_stats: dict[str, torch.Tensor],
    ) -> None:
        """Back-propagate `numerator`; sum `reported_loss` (a numerator over the same
        denominator) and the per-token `token_stats` (B, T) over real tokens."""
        numerator.backward()
        m = mask.to(torch.float32)
        self._rows += rows
        self._tokens += float(m.sum())
        self._denominator += denominator
        self._loss_sum += float(reported_loss.detach())
        for key, value in token_stats.items():
            total = float((value.detach().float() * m).sum())
            self._token_sums[key] = self._token_sums.get(key, 0.0) + total

    def discard_step(self) -> None:
        """Drop a half-accumulated step (its rows will be redone after a failure)."""
        self._reset_step()

    def end_step(self, step: int) -> dict[str, float]:
        if self._is_data_parallel():
            self._reduce_counters()  # every rank now holds the global counts
            if self._rows > 0:  # the same decision on every rank: the count is global
                self._reduce_gradients()
        if self._rows == 0:
            self._reset_step()
            return {}
        scale = 1.0 / max(self._denominator, 1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1
        prefix = self.metric_prefix
        tokens = max(self._tokens, 1.0)
        metrics = {key: total / tokens for key, total in self._token_sums.items()}
        metrics[f"{prefix}/{self.loss_metric}"] = self._loss_sum * scale
        metrics[f"{prefix}/grad_norm"] = float(grad_norm)
        metrics[f"{prefix}/lr"] = float(lr)
        metrics[f"{prefix}/rows"] = float(self._rows)
        metrics[f"{prefix}/tokens"] = self._tokens
        self._reset_step()
        return metrics

    # -- data parallel ----------------------------------------------------------------

    def _is_data_parallel(self) -> bool:
        """Whether this replica is one rank of several. Decided by the replica's own
        context, not by whether the process is in a group: a single-replica trainer
        sharing a worker process with a data-parallel one must not join its collectives.
        """
        ranks = self.ctx.num_replicas
        if ranks <= 1:
            return False
        group = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if group != ranks:
            # training alone would silently let the replicas' weights drift apart
            raise OperatorError(
                self.operator_name,
                f"replica {self.ctx.replica} of {ranks} data-parallel ranks, but its process "
                f"group has {group} rank(s): join one first "
                "(asyncflow.runtime.data_parallel.join)",
            )
        return True

    def _reduce_counters(self) -> None:
        """Sum the step's counters and token statistics over the ranks, and learn which
        parameters got a gradient on any rank.

        One all_gather of a small tuple per rank: it also agrees on the token-stat keys
        (a rank that saw no rows has none), and every rank adds the same values in the
        same (rank) order, so the sums are bit-identical everywhere.
        """
        params = list(self.model.parameters())
        mine = (
            self._rows,
            self._tokens,
            self._denominator,
            self._loss_sum,
            dict(self._token_sums),
            [p.grad is not None for p in params],
        )
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        self._rows = sum(r[0] for r in every)
        self._tokens = sum((r[1] for r in every), 0.0)
        self._denominator = sum((r[2] for r in every), 0.0)
        self._loss_sum = sum((r[3] for r in every), 0.0)
        keys = sorted(set().union(*(r[4] for r in every)))
        self._token_sums = {k: sum((r[4].get(k, 0.0) for r in every), 0.0) for k in keys}
        self._grad_on_any_rank = [any(r[5][i] for r in every) for i in range(len(params))]

    def _reduce_gradients(self) -> None:
        """Sum the gradient numerators over the ranks: one all-reduce per (dtype, device)
        of all gradients flattened into one buffer, instead of one per parameter.

        A parameter with a gradient on some rank but not on this one counts as zeros
        here, so every rank reduces identical buffers; one with a gradient on no rank
        stays without one, as it would in a single trainer (AdamW skips it).
        """
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        for p, used in zip(self.model.parameters(), self._grad_on_any_rank, strict=True):
            if used:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for params in buckets.values():
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
