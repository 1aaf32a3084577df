"""Generate: sample a response for every row's prompt with the current policy weights."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa

from asyncflow.operators.checks import require_nonempty
from asyncflow.operators.generation import SamplingParams, generate, row_seeds
from asyncflow.operators.policy import ModelBuilder
from asyncflow.operators.tensors import sequences_to_list
from asyncflow.operators.training import ModelOperator


class Generate(ModelOperator):
    """Rollout operator. Each row records the policy version that sampled it.

    Sampling is seeded per row from (run seed, sample id): every row draws from its own
    random stream, and sample ids are unique across a run, so a row's tokens depend only
    on its prompt, the weights and that pair -- not on how rows were cut into
    micro-batches, which replica ran them, or when. Replaying a recorded rollout with the
    same weights therefore reproduces its tokens on CPU. One response per row: the
    prompt source expands each prompt into its group (so `sampling.n` must be 1 here).
    `entropy_column` adds the per-token entropy of the sampling distribution as a
    `list<float32>` column.
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
        want_entropy = self.entropy_column is not None
        out = generate(
            self.model,
            prompts,
            self.sampling,
            return_entropy=want_entropy,
            seeds=self._seeds_for(batch),
        )
        result = {
            "response_ids": sequences_to_list(out.responses, pa.int32()),
            "rollout_logprob": sequences_to_list(out.logprobs, pa.float32()),
            "policy_version": pa.array(np.full(len(prompts), self.version), pa.int64()),
        }
        if out.entropies is not None:
            result[self.entropy_column] = sequences_to_list(out.entropies, pa.float32())
        return result

    def _seeds_for(self, batch: pa.RecordBatch) -> list[int]:
        """One stream key per row from (run seed, sample id); row positions stand in for
        sample ids when a caller hands a batch without them."""
        if "sample_id" in batch.schema.names:
            ids = batch.column("sample_id").to_pylist()
        else:
            ids = range(batch.num_rows)
        return row_seeds(getattr(self.ctx, "run_seed", 0), ids)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding for evaluation, with whatever weights this replica holds."""
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_id=self.sampling.eos_id,
            pad_id=self.sampling.pad_id,
        )
        return generate(self.model, prompts, params).responses
