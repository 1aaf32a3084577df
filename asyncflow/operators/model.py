"""A compact causal language model with a KV cache, small enough to train on a CPU.

Built from a config (never downloaded), it is the default policy for the
synthetic tasks. Rows may be left-padded for batched generation: position ids
count real tokens only, so a sequence gets the same positions whether it was
left-padded for sampling or right-padded for training, and logits agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v), each (B, H, T, Dh)


@runtime_checkable
class CausalLMLike(Protocol):
    """What sampling, scoring and training need from a language model.

    The native `CausalLM` satisfies it, and so does `hf.HFCausalLM` around any
    `transformers` causal LM. `attention_mask` (B, S) covers past + current
    tokens (1 = real); position ids count real tokens, so left- and right-padded
    rows agree. `past` is opaque to callers: whatever the last call returned.
    """

    hidden_size: int

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past: Any = None
    ) -> tuple[torch.Tensor, Any]: ...  # logits (B, T, V), new past

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...  # (B, T, hidden_size): the trunk's output before the LM head


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    max_seq_len: int = 32
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        bias: torch.Tensor,  # (B, 1, T, S) additive mask over all S = past + T keys
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, S, Dh)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, Dh)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y), (k, v)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(self, x, bias, past):
        a, present = self.attn(self.ln1(x), bias, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), present


class CausalLM(nn.Module):
    """Decoder-only transformer; `forward` serves training, scoring and cached decoding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(_init_weights)

    @property
    def hidden_size(self) -> int:
        return self.cfg.d_model

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, over past + current
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        x, present = self._trunk(input_ids, attention_mask, past)
        return self.head(x), present  # logits (B, T, V)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, d_model) final-layer-norm output: what value and reward heads read."""
        return self._trunk(input_ids, attention_mask, None)[0]

    def _trunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: KVCache | None
    ) -> tuple[torch.Tensor, KVCache]:
        B, T = input_ids.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        S = past_len + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past_len:]  # (B, T)
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {int(positions.max()) + 1} tokens exceeds max_seq_len "
                f"{self.cfg.max_seq_len}"
            )
        bias = _attention_bias(attention_mask, T, past_len)  # (B, 1, T, S)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, bias, None if past is None else past[i])
            present.append(kv)
        return self.ln_f(x), present  # (B, T, C)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _attention_bias(attention_mask: torch.Tensor, T: int, past_len: int) -> torch.Tensor:
    """Additive mask: query t sees key s iff s is real and s <= past_len + t."""
    S = attention_mask.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(past_len)
    allowed = causal[None, :, :] & attention_mask.bool()[:, None, :]  # (B, T, S)
    # A fully masked query row (a left-pad position) would give NaN; let it see itself.
    eye = torch.zeros(T, S, dtype=torch.bool, device=attention_mask.device)
    eye[torch.arange(T), past_len + torch.arange(T)] = True
    allowed = allowed | (eye[None] & ~allowed.any(dim=2, keepdim=True))
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=attention_mask.device)
    return bias.masked_fill(~allowed, float("-inf"))[:, None]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def save_model(model: CausalLM, path: str | Path) -> None:
    save_weights(model.state_dict(), model.cfg, path)


def save_weights(state: dict[str, torch.Tensor], cfg: ModelConfig | None, path: str | Path) -> None:
    """Safetensors weights + the native model's config (if any) in its metadata: loadable
    without unpickling."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"asyncflow_model_config": cfg.to_json()} if cfg is not None else None
    save_file(tensors, str(path), metadata=metadata)


def load_model(path: str | Path) -> CausalLM:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "asyncflow_model_config" not in meta:
        raise ValueError(f"{path}: not an asyncflow model file (no asyncflow_model_config)")
    model = CausalLM(ModelConfig.from_json(meta["asyncflow_model_config"]))
    model.load_state_dict(load_file(str(path)))
    return model
