"""Run a `transformers` causal LM and tokenizer through asyncflow's operators.

`HFCausalLM` wraps any `AutoModelForCausalLM` into the `model.CausalLMLike`
protocol the native model satisfies: `forward(input_ids, attention_mask, past)
-> (logits, past)` with position ids counted over real tokens (so left-padded
sampling and right-padded scoring agree) and the KV cache passed through as is.
`HFModelSpec` builds one on the worker (from a config, or a local directory: no
hub), so `Generate`, `LogProb`, `PolicyUpdate`, `Values`, ... take it in place of
`ModelSpec`. `HFTokenizer` gives a tokenizer the interface `Reward` expects.

transformers is an optional dependency (`pip install asyncflow[hf]`): it is
imported only when one of these is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "asyncflow.operators.hf needs transformers: pip install 'asyncflow[hf]'"
        ) from exc
    return transformers


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the `CausalLMLike` protocol."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    @property
    def hidden_size(self) -> int:
        config = self.hf.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S) over past + current tokens
        past: Any = None,  # whatever the previous call returned (a transformers Cache)
    ) -> tuple[torch.Tensor, Any]:
        attention_mask, positions = _mask_and_positions(input_ids, attention_mask, past)
        out = self.hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        return out.logits, out.past_key_values  # logits (B, T, V)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, C) output of the trunk (`base_model`), before the LM head."""
        attention_mask, positions = _mask_and_positions(input_ids, attention_mask, None)
        out = self.hf.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
        )
        return out.last_hidden_state


def _mask_and_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, S) mask (all real if None) and (B, T) positions counting real tokens only."""
    B, T = input_ids.shape
    past_len = _past_length(past)
    if attention_mask is None:
        attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=input_ids.device)
    attention_mask = attention_mask.long()
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, past_len:]  # (B, T)
    return attention_mask, positions


def _past_length(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):  # transformers Cache objects
        return int(past.get_seq_length())
    return int(past[0][0].shape[2])  # legacy tuple of (k, v) per layer, (B, H, S, Dh)


@dataclass(frozen=True)
class HFModelSpec:
    """A transformers causal LM to build on the worker.

    Either `config` (a `PretrainedConfig`: random init seeded by the replica's seed)
    or `path` (a local directory saved with `save_pretrained`; never the hub).
    """

    config: Any = None
    path: str | None = None
    attn_implementation: str = "sdpa"
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if (self.config is None) == (self.path is None):
            raise ValueError("HFModelSpec needs exactly one of config= or path=")

    def build(self, seed: int = 0) -> HFCausalLM:
        tf = _transformers()
        kwargs = {"attn_implementation": self.attn_implementation}
        if self.path is not None:
            if not Path(self.path).is_dir():
                raise FileNotFoundError(f"transformers model directory not found: {self.path}")
            model = tf.AutoModelForCausalLM.from_pretrained(
                self.path, local_files_only=True, **kwargs
            )
        else:
            torch.manual_seed(seed)
            model = tf.AutoModelForCausalLM.from_config(self.config, **kwargs)
        return HFCausalLM(model.to(self.dtype))


class HFTokenizer:
    """A transformers tokenizer with the interface of `tokenizer.CharTokenizer`.

    `decode` stops at the first eos and drops special tokens, as reward functions
    expect the completion text only.
    """

    def __init__(self, tokenizer: Any):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token first")
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if bos:
            if self.bos_id is None:
                raise ValueError("the tokenizer has no bos token")
            ids = [self.bos_id, *ids]
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def byte_level_tokenizer() -> Any:
    """A byte-level `PreTrainedTokenizerFast` built in code: ids 0-2 are <pad>, <bos>, <eos>,
    then byte b is id b + 3 (259 ids). Nothing is downloaded; any text round-trips.
    """
    _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte, char in _bytes_to_unicode().items():
        vocab[char] = len(specials) + byte
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable Latin-1 bytes map to themselves and the
    other bytes to code points from 256 on, so every byte is one visible character."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out
