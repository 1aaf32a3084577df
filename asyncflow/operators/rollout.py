"""Generate: sample a response for every row's prompt with the current policy weights."""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from asyncflow.operators.checks import require_nonempty
from asyncflow.operators.generation import SamplingParams, generate
from asyncflow.operators.policy import ModelBuilder
from asyncflow.operators.tensors import sequences_to_list
from asyncflow.operators.training import ModelOperator


class Generate(ModelOperator):
    """Rollout operator. Each row records the policy version that sampled it.

    Sampling is seeded from (run seed, first sample id of the micro-batch), so the
    same rows with the same weights reproduce the same tokens on CPU. One response
    per row: the prompt source expands each prompt into its group (so `sampling.n`
    must be 1 here). `entropy_column` adds the per-token entropy of the sampling
    distribution as a `list<float32>` column.
    """

    reads: ClassVar = {"prompt_ids": "list<int32>"}

    def __init__(
        self, model: ModelBuilder, sampling: SamplingParams, *, entropy_column: str | None = None
    ):
        if sampling.n != 1:
            raise ValueError(
                f"Generate writes one response per row; got sampling.n={sampling.n}. "
                "Expand prompts into groups in the source instead (one row per sample)."
            )
        self.model_spec = model
        self.sampling = sampling
        self.entropy_column = entropy_column
        self.writes = {
            "response_ids": "list<int32>",
            "rollout_logprob": "list<float32>",
            "policy_version": "int64",
        }
        if entropy_column is not None:
            self.writes[entropy_column] = "list<float32>"

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        require_nonempty(self.operator_name, batch, "prompt_ids", "there is nothing to continue")
        prompts = batch.column("prompt_ids").to_pylist()
        generator = torch.Generator().manual_seed(self._seed_for(batch))
        want_entropy = self.entropy_column is not None
        out = generate(self.model, prompts, self.sampling, generator, return_entropy=want_entropy)
        result = {
            "response_ids": sequences_to_list(out.responses, pa.int32()),
            "rollout_logprob": sequences_to_list(out.logprobs, pa.float32()),
            "policy_version": pa.array(np.full(len(prompts), self.version), pa.int64()),
        }
        if out.entropies is not None:
            result[self.entropy_column] = sequences_to_list(out.entropies, pa.float32())
        return result

    def _seed_for(self, batch: pa.RecordBatch) -> int:
        first = batch.column("sample_id")[0].as_py() if "sample_id" in batch.schema.names else 0
        digest = hashlib.blake2b(f"{self.ctx.seed}:{first}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding for evaluation, with whatever weights this replica holds."""
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_id=self.sampling.eos_id,
            pad_id=self.sampling.pad_id,
        )
        return generate(self.model, prompts, params).responses
