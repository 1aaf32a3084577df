"""Generate: sample a response for every row's prompt with the current policy weights."""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from asyncflow.operators.base import OperatorContext, WeightedOperator, Weights
from asyncflow.operators.generation import SamplingParams, generate
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.tensors import sequences_to_list


class Generate(WeightedOperator):
    """Rollout operator. Each row records the policy version that sampled it.

    Sampling is seeded from (run seed, first sample id of the micro-batch), so the
    same rows with the same weights reproduce the same tokens on CPU.
    """

    reads: ClassVar = {"prompt_ids": "list<int32>"}
    writes: ClassVar = {
        "response_ids": "list<int32>",
        "rollout_logprob": "list<float32>",
        "policy_version": "int64",
    }

    def __init__(self, model: ModelSpec, sampling: SamplingParams):
        self.model_spec = model
        self.sampling = sampling

    def setup(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.model = self.model_spec.build(seed=ctx.seed)
        self.version = 0

    def __call__(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        prompts = batch.column("prompt_ids").to_pylist()
        generator = torch.Generator().manual_seed(self._seed_for(batch))
        out = generate(self.model, prompts, self.sampling, generator)
        return {
            "response_ids": sequences_to_list(out.responses, pa.int32()),
            "rollout_logprob": sequences_to_list(out.logprobs, pa.float32()),
            "policy_version": pa.array(np.full(len(prompts), self.version), pa.int64()),
        }

    def _seed_for(self, batch: pa.RecordBatch) -> int:
        first = batch.column("sample_id")[0].as_py() if "sample_id" in batch.schema.names else 0
        digest = hashlib.blake2b(f"{self.ctx.seed}:{first}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def get_weights(self) -> tuple[int, Weights]:
        return self.version, {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, version: int, weights: Weights) -> None:
        self.model.load_state_dict(weights)
        self.version = version

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding for evaluation, with whatever weights this replica holds."""
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_id=self.sampling.eos_id,
            pad_id=self.sampling.pad_id,
        )
        return generate(self.model, prompts, params).responses
