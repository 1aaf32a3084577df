"""Scalar heads on a language-model trunk: the PPO critic and a reward model.

Both are the LM's trunk (everything before its vocabulary head) plus one linear
layer to a scalar. The critic reads it at every response position (the state
before each response token, like the log-probs); the reward model reads it at
the last real token of prompt+response, as a sequence classifier does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from asyncflow.operators.generation import gather_columns, pack_responses
from asyncflow.operators.model import CausalLMLike
from asyncflow.operators.policy import ModelBuilder

HEAD_KINDS = ("value", "reward")


class ScalarHeadModel(nn.Module):
    """LM trunk + linear head to one scalar per position."""

    def __init__(self, trunk: CausalLMLike):
        super().__init__()
        self.trunk = trunk
        self.score = nn.Linear(trunk.hidden_size, 1)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def token_scores(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:
        h = self.trunk.hidden_states(input_ids, attention_mask)  # (B, T, C)
        return self.score(h.float()).squeeze(-1)  # (B, T)


class ValueModel(ScalarHeadModel):
    """The critic V(s_t): one value per response token, read where its log-prob is."""

    def forward(
        self,
        prompt_ids: torch.Tensor,  # (B, P) right-padded
        prompt_mask: torch.Tensor,  # (B, P) bool
        response_ids: torch.Tensor,  # (B, R) right-padded
        response_mask: torch.Tensor,  # (B, R) bool
    ) -> torch.Tensor:
        seq, attn, predict_at = pack_responses(prompt_ids, prompt_mask, response_ids, response_mask)
        values = gather_columns(self.token_scores(seq, attn), predict_at)  # (B, R)
        return values * response_mask


class RewardModel(ScalarHeadModel):
    """A sequence classifier: r(prompt, response) read at the last real token."""

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        seq, attn, _ = pack_responses(prompt_ids, prompt_mask, response_ids, response_mask)
        last = attn.sum(dim=1) - 1  # (B,) column of the last real token
        return gather_columns(self.token_scores(seq, attn), last[:, None]).squeeze(1)  # (B,)


@dataclass(frozen=True)
class HeadSpec:
    """A critic (`kind="value"`) or reward model (`kind="reward"`) to build on the worker.

    `trunk` is any model spec with `build(seed)` (`policy.ModelSpec`, `hf.HFModelSpec`);
    `init_path` optionally loads a safetensors state dict of the whole head model
    (see `save_head`), e.g. a trained reward model.
    """

    trunk: ModelBuilder
    kind: str = "value"
    init_path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; choose one of {HEAD_KINDS}")

    def build(self, seed: int = 0) -> ScalarHeadModel:
        trunk = self.trunk.build(seed=seed)
        torch.manual_seed(seed + 1)  # the head's own init, independent of the trunk's
        model = (ValueModel if self.kind == "value" else RewardModel)(trunk)
        if self.init_path is not None:
            from safetensors.torch import load_file

            if not Path(self.init_path).exists():
                raise FileNotFoundError(f"head weights not found: {self.init_path}")
            model.load_state_dict(load_file(self.init_path))
        return model


def save_head(model: ScalarHeadModel, path: str | Path) -> None:
    """Safetensors state dict of a head model, loadable by `HeadSpec(init_path=...)`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
