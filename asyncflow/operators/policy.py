"""Where an operator's model comes from: a config plus optional initial weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from asyncflow.operators.model import CausalLM, ModelConfig, load_model


class ModelBuilder(Protocol):
    """A light, picklable description of a model, built on the worker: `ModelSpec` (native),
    `hf.HFModelSpec` (transformers), `heads.HeadSpec` (critic / reward model)."""

    def build(self, seed: int = 0) -> nn.Module: ...  # a CausalLMLike, or a head model


@dataclass(frozen=True)
class ModelSpec:
    """A model to build on the worker: from a safetensors file, or fresh from `config`."""

    config: ModelConfig
    init_path: str | None = None

    def build(self, seed: int = 0) -> CausalLM:
        if self.init_path is not None:
            if not Path(self.init_path).exists():
                raise FileNotFoundError(f"initial weights not found: {self.init_path}")
            model = load_model(self.init_path)
            if model.cfg != self.config:
                raise ValueError(
                    f"{self.init_path}: model config {model.cfg} differs from the "
                    f"workflow's {self.config}"
                )
            return model
        torch.manual_seed(seed)
        return CausalLM(self.config)
