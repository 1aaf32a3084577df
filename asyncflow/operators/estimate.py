"""Advantage operators: turn rewards into per-sample advantages."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import torch

from asyncflow.operators.advantages import grpo_advantages
from asyncflow.operators.base import Operator


class GroupAdvantage(Operator):
    """GRPO group-normalised advantage (Dr.GRPO with `normalize_std=False`)."""

    reads: ClassVar = {"reward": "float32", "group_id": "int64"}
    writes: ClassVar = {"advantage": "float32"}
    needs_whole_groups: ClassVar[bool] = True

    def __init__(self, normalize_std: bool = True, eps: float = 1e-6):
        self.normalize_std = normalize_std
        self.eps = eps

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        rewards = torch.tensor(batch.column("reward").to_numpy(zero_copy_only=False))
        groups = torch.tensor(batch.column("group_id").to_numpy(zero_copy_only=False))
        adv = grpo_advantages(rewards, groups, eps=self.eps, normalize_std=self.normalize_std)
        return {"advantage": pa.array(adv.numpy(), pa.float32())}
