"""Operator classes called in-process (no Dask): Reward, GroupAdvantage, Generate, PolicyUpdate."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from asyncflow.errors import OperatorError
from asyncflow.operators.base import OperatorContext
from asyncflow.operators.estimate import GroupAdvantage
from asyncflow.operators.generation import SamplingParams, response_logprobs
from asyncflow.operators.losses import kl_estimate, masked_mean, ppo_clip_loss
from asyncflow.operators.model import ModelConfig
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.rollout import Generate
from asyncflow.operators.scoring import LogProb, Reward
from asyncflow.operators.tensors import list_to_padded
from asyncflow.operators.tokenizer import CharTokenizer
from asyncflow.operators.update import OptimConfig, PolicyUpdate
from asyncflow.runtime.contracts import check_output

TOK = CharTokenizer("0123456789+=")
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
SPEC = ModelSpec(CFG)
I32 = pa.list_(pa.int32())
F32 = pa.list_(pa.float32())


def ids_col(ids) -> pa.Array:
    return pa.array(ids, pa.int64())


# --- Reward -----------------------------------------------------------------------------------

PROBLEMS = ["1+2=", "3+4=", "9+9=", "0+0="]
ANSWERS = ["3", "7", "18", "0"]
COMPLETIONS = ["3", "8", "18", "0"]
SAMPLE_IDS = [100, 101, 102, 103]


def reward_batch(with_ids: bool = True) -> pa.RecordBatch:
    columns = {
        "prompt_ids": pa.array([TOK.encode(p, bos=True) for p in PROBLEMS], I32),
        # eos ends a completion; the last one was cut by the token budget (no eos)
        "response_ids": pa.array(
            [
                TOK.encode("3", eos=True),
                TOK.encode("8", eos=True),
                [*TOK.encode("18", eos=True), TOK.pad_id],  # text stops at eos
                TOK.encode("0"),
            ],
            I32,
        ),
        "answer": pa.array(ANSWERS),
    }
    if with_ids:
        columns = {"sample_id": ids_col(SAMPLE_IDS), **columns}
    return pa.RecordBatch.from_pydict(columns)


def reward_op(functions, weights=None) -> Reward:
    op = Reward(functions, TOK, weights=weights, extra_columns={"answer": "string"})
    op.setup(OperatorContext(name="reward"))
    return op


def test_reward_weighted_sum_and_per_function_columns():
    calls = []

    def exact(prompts, completions, answer, **kwargs):  # TRL signature
        calls.append((list(prompts), list(completions), list(answer), kwargs))
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    def length_penalty(prompts, completions, **kwargs):
        return [-0.25 * len(c) for c in completions]

    op = reward_op(
        {"exact": exact, "length_penalty": length_penalty},
        weights={"exact": 2.0, "length_penalty": 0.5},
    )
    assert op.writes == {"reward": "float32", "exact": "float32", "length_penalty": "float32"}
    assert op.reads == {
        "prompt_ids": "list<int32>",
        "response_ids": "list<int32>",
        "answer": "string",
    }
    out = check_output("reward", op.writes, op(reward_batch()), SAMPLE_IDS)

    # Functions see decoded text (bos/eos/pad dropped) and the extra columns as keywords.
    assert calls == [(PROBLEMS, COMPLETIONS, ANSWERS, {})]
    # exact           = [1, 0, 1, 1]
    # length_penalty  = -0.25 * [1, 1, 2, 1] = [-0.25, -0.25, -0.5, -0.25]
    # reward = 2 * exact + 0.5 * length_penalty = [1.875, -0.125, 1.75, 1.875]
    assert out.column("exact").to_pylist() == [1.0, 0.0, 1.0, 1.0]
    assert out.column("length_penalty").to_pylist() == [-0.25, -0.25, -0.5, -0.25]
    assert out.column("reward").to_pylist() == [1.875, -0.125, 1.75, 1.875]


def test_reward_weights_default_to_one():
    op = reward_op({"a": lambda p, c, **kw: [1.0] * len(c), "b": lambda p, c, **kw: [0.5] * len(c)})
    out = op(reward_batch())
    assert out["reward"].to_pylist() == [1.5] * 4


def test_reward_needs_a_function():
    with pytest.raises(ValueError, match="at least one reward function"):
        Reward({}, TOK)


def test_reward_wrong_count_names_operator_and_samples():
    op = reward_op({"short": lambda p, c, **kw: [1.0]})
    with pytest.raises(OperatorError) as info:
        op(reward_batch())
    err = info.value
    assert err.operator == "reward"
    assert err.sample_ids == SAMPLE_IDS
    assert "reward function 'short' returned 1 scores for 4 completions" in str(err)
    assert "[samples 100, 101, 102, 103]" in str(err)


def test_reward_nan_names_the_bad_samples():
    op = reward_op({"flaky": lambda p, c, **kw: [0.0, math.nan, 1.0, math.inf]})
    with pytest.raises(OperatorError) as info:
        op(reward_batch())
    err = info.value
    assert err.operator == "reward"
    assert err.sample_ids == [101, 103]
    assert "reward function 'flaky' gave NaN/inf" in str(err)


def test_reward_nan_without_sample_ids_names_row_indices():
    op = reward_op({"flaky": lambda p, c, **kw: [math.nan, 0.0, 0.0, 0.0]})
    with pytest.raises(OperatorError) as info:
        op(reward_batch(with_ids=False))
    assert info.value.sample_ids == [0]


# --- GroupAdvantage ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantage_on_record_batch(normalize_std):
    batch = pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col([0, 1, 2, 3, 4, 5]),
            "reward": pa.array([1, 2, 0, 4, 1, 6], pa.float32()),
            "group_id": pa.array([7, 3, 7, 3, 7, 3], pa.int64()),
        }
    )
    op = GroupAdvantage(normalize_std=normalize_std)
    assert op.needs_whole_groups
    out = check_output("advantage", op.writes, op(batch), list(range(6)))
    got = out.column("advantage").to_pylist()
    # group 7: [1, 0, 1], mean 2/3, std sqrt(1/3); group 3: [2, 4, 6], mean 4, std 2
    if normalize_std:
        s = math.sqrt(1 / 3) + 1e-6
        expected = [(1 / 3) / s, -2 / (2 + 1e-6), (-2 / 3) / s, 0.0, (1 / 3) / s, 2 / (2 + 1e-6)]
    else:
        expected = [1 / 3, -2.0, -2 / 3, 0.0, 1 / 3, 2.0]
    assert got == pytest.approx(expected, abs=1e-6)


# --- Generate ---------------------------------------------------------------------------------

SAMPLING = SamplingParams(max_new_tokens=6, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
GEN_PROMPTS = [TOK.encode(p, bos=True) for p in ["1+2=", "3+4=", "12+9=", "0+0="]]


def prompt_batch(first_id: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col(range(first_id, first_id + len(GEN_PROMPTS))),
            "prompt_ids": pa.array(GEN_PROMPTS, I32),
        }
    )


@pytest.fixture(scope="module")
def rollout() -> Generate:
    op = Generate(SPEC, SAMPLING)
    op.setup(OperatorContext(name="rollout", seed=3))
    return op


def test_generate_output_matches_declared_writes(rollout):
    ids = list(range(len(GEN_PROMPTS)))
    out = check_output("rollout", rollout.writes, rollout(prompt_batch()), ids)
    assert out.schema.names == ["response_ids", "rollout_logprob", "policy_version"]
    responses = out.column("response_ids").to_pylist()
    logprobs = out.column("rollout_logprob").to_pylist()
    for resp, logp in zip(responses, logprobs, strict=True):
        assert 1 <= len(resp) <= SAMPLING.max_new_tokens
        assert len(logp) == len(resp)
        assert all(0 <= t < CFG.vocab_size for t in resp)
        assert all(lp <= 0 for lp in logp)
    assert out.column("policy_version").to_pylist() == [0] * len(GEN_PROMPTS)

    # The reported log-probs are those of the operator's own model.
    prompt, prompt_mask = list_to_padded(prompt_batch().column("prompt_ids"), dtype=torch.long)
    resp, resp_mask = list_to_padded(out.column("response_ids"), dtype=torch.long)
    with torch.no_grad():
        recomputed = response_logprobs(rollout.model, prompt, prompt_mask, resp, resp_mask)
    reported, _ = list_to_padded(out.column("rollout_logprob"))
    torch.testing.assert_close(recomputed, reported, atol=1e-4, rtol=0)


def test_generate_is_seeded_by_first_sample_id(rollout):
    a = rollout(prompt_batch(0))
    b = rollout(prompt_batch(0))
    c = rollout(prompt_batch(1000))
    assert a["response_ids"].equals(b["response_ids"])
    assert a["rollout_logprob"].equals(b["rollout_logprob"])
    assert not a["response_ids"].equals(c["response_ids"])


def test_generate_records_policy_version():
    op = Generate(SPEC, SAMPLING)
    op.setup(OperatorContext(name="rollout"))
    version, weights = op.get_weights()
    assert version == 0
    op.set_weights(5, weights)
    out = op(prompt_batch())
    assert out["policy_version"].to_pylist() == [5] * len(GEN_PROMPTS)
    assert op.get_weights()[0] == 5


def test_generate_greedy_is_deterministic(rollout):
    a = rollout.greedy(GEN_PROMPTS, max_new_tokens=4)
    assert a == rollout.greedy(GEN_PROMPTS, max_new_tokens=4)
    assert all(1 <= len(r) <= 4 for r in a)


# --- LogProb ----------------------------------------------------------------------------------


def test_logprob_operator_scores_with_its_model(rollout):
    gen = check_output("rollout", rollout.writes, rollout(prompt_batch()), [0, 1, 2, 3])
    batch = pa.RecordBatch.from_arrays(
        [prompt_batch().column("prompt_ids"), gen.column("response_ids")],
        names=["prompt_ids", "response_ids"],
    )
    op = LogProb(SPEC)  # same spec and seed as the rollout model: same weights
    op.setup(OperatorContext(name="ref", seed=3))
    out = check_output("ref", op.writes, op(batch), [0, 1, 2, 3])
    assert out.schema.names == ["ref_logprob"]
    ref = out.column("ref_logprob").to_pylist()
    rollout_lp = gen.column("rollout_logprob").to_pylist()
    for r, g in zip(ref, rollout_lp, strict=True):
        assert r == pytest.approx(g, abs=1e-4)


# --- PolicyUpdate -----------------------------------------------------------------------------

UPDATE_PROMPTS = [
    [1, 4, 13, 5, 14],
    [1, 5, 13],
    [1, 6, 7],
    [1, 9],
    [1, 3],
    [1, 4, 4],
    [1, 10],
    [1, 11],
]


def update_batch(responses, *, ref: bool = False) -> pa.RecordBatch:
    rng = np.random.default_rng(0)
    old = [(-rng.uniform(0.5, 4.0, len(r))).astype(np.float32).tolist() for r in responses]
    columns = {
        "sample_id": ids_col(range(len(responses))),
        "prompt_ids": pa.array(UPDATE_PROMPTS[: len(responses)], I32),
        "response_ids": pa.array(responses, I32),
        "rollout_logprob": pa.array(old, F32),
        "advantage": pa.array(np.linspace(-1.5, 1.0, len(responses)), pa.float32()),
    }
    if ref:
        refs = [(-rng.uniform(0.5, 4.0, len(r))).astype(np.float32).tolist() for r in responses]
        columns["ref_logprob"] = pa.array(refs, F32)
    return pa.RecordBatch.from_pydict(columns)


# Ragged rows, but both halves hold 10 response tokens: token-means over each half weight
# tokens exactly like the token-mean over all 8 rows.
BALANCED = [[3, 4, 2], [5, 2], [6], [7, 8, 9, 2], [3, 2], [4, 4, 2], [9, 9], [10, 11, 2]]
# Halves with 13 and 10 tokens.
UNBALANCED = [[3, 4, 2], [5, 2, 3, 3, 3], [6], [7, 8, 9, 2], [3, 2], [4, 4, 2], [9, 9], [10, 11, 2]]


def updater(**kwargs) -> PolicyUpdate:
    # A small lr: Adam rescales every coordinate to ~lr, so float noise in gradients that are
    # zero in exact arithmetic (e.g. attention key biases) moves parameters by up to ~lr/100.
    kwargs.setdefault("optim", OptimConfig(lr=1e-4))
    op = PolicyUpdate(SPEC, **kwargs)
    op.setup(OperatorContext(name="actor"))
    return op


def run_step(batches, **kwargs):
    """Feed micro-batches, return (accumulated loss-numerator grads, deltas, metrics, op).

    The grads are those of the summed loss numerators; `end_step` divides them by
    the step's denominator (tokens for token-mean) before stepping.
    """
    op = updater(**kwargs)
    before = {k: v.clone() for k, v in op.model.state_dict().items()}
    for b in batches:
        assert op(b) == {}
    grads = {n: p.grad.clone() for n, p in op.model.named_parameters()}
    metrics = op.end_step(0)
    after = op.model.state_dict()
    return grads, {k: after[k] - before[k] for k in before}, metrics, op


def assert_same_step(one, two, atol=1e-6):
    for name in one[0]:
        torch.testing.assert_close(two[0][name], one[0][name], atol=1e-6, rtol=1e-5)
    for name in one[1]:
        torch.testing.assert_close(two[1][name], one[1][name], atol=atol, rtol=0)


def test_gradient_accumulation_is_exact():
    full = update_batch(BALANCED)
    one = run_step([full])
    two = run_step([full.slice(0, 4), full.slice(4, 4)])
    assert_same_step(one, two)
    assert any(d.abs().max() > 1e-5 for d in one[1].values())  # the step did move weights
    for key in ("actor/pg_loss", "actor/clip_frac", "actor/ratio_mean", "actor/grad_norm"):
        assert two[2][key] == pytest.approx(one[2][key], abs=1e-6)


def test_gradient_accumulation_is_exact_with_unbalanced_token_counts():
    full = update_batch(UNBALANCED)
    one = run_step([full])
    two = run_step([full.slice(0, 4), full.slice(4, 4)])
    assert_same_step(one, two)


def test_policy_update_gradient_matches_direct_loss():
    full = update_batch(BALANCED)
    grads, _, metrics, _ = run_step([full])
    model = SPEC.build(seed=0)  # same init as the operator (seed from the context)
    model.train()
    prompt, prompt_mask = list_to_padded(full.column("prompt_ids"), dtype=torch.long)
    resp, mask = list_to_padded(full.column("response_ids"), dtype=torch.long)
    old, _ = list_to_padded(full.column("rollout_logprob"))
    adv = torch.tensor(full.column("advantage").to_numpy())
    logp = response_logprobs(model, prompt, prompt_mask, resp, mask)
    loss, direct = ppo_clip_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    tokens = float(mask.sum())  # token-mean: end_step divides the numerator grads by this
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name] / tokens, p.grad, atol=1e-7, rtol=1e-5)
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert metrics["actor/clip_frac"] == pytest.approx(direct["actor/clip_frac"].item(), abs=1e-6)


def test_end_step_increments_version_and_reports_metrics():
    op = updater()
    assert op.get_weights()[0] == 0
    assert op.end_step(0) == {}  # nothing fed: no step, no version bump
    assert op.version == 0
    op(update_batch(BALANCED))
    metrics = op.end_step(0)
    assert op.version == 1
    assert op.get_weights()[0] == 1
    assert {
        "actor/pg_loss",
        "actor/clip_frac",
        "actor/approx_kl",
        "actor/ratio_mean",
        "actor/grad_norm",
        "actor/rows",
    } <= metrics.keys()
    assert metrics["actor/rows"] == 8.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert all(p.grad is None for p in op.model.parameters())  # reset for the next step
    op(update_batch(BALANCED))
    op.end_step(1)
    assert op.version == 2


def test_get_weights_is_a_copy():
    op = updater()
    _, weights = op.get_weights()
    op(update_batch(BALANCED))
    op.end_step(0)
    _, new = op.get_weights()
    assert any(not torch.equal(weights[k], new[k]) for k in weights)


def test_kl_penalty_reads_reference_and_reports_kl():
    assert "ref_logprob" not in updater().reads
    op = updater(kl_coef=0.1)
    assert op.reads["ref_logprob"] == "list<float32>"
    batch = update_batch(BALANCED, ref=True)
    with torch.no_grad():
        prompt, prompt_mask = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, mask = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        ref, _ = list_to_padded(batch.column("ref_logprob"))
        logp = response_logprobs(op.model, prompt, prompt_mask, resp, mask)
        expected_kl = masked_mean(kl_estimate(logp, ref, "k3"), mask).item()
    op(batch)
    metrics = op.end_step(0)
    assert metrics["actor/kl"] == pytest.approx(expected_kl, rel=1e-5)


def test_policy_update_rejects_unknown_loss_aggregation():
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'mean'"):
        PolicyUpdate(SPEC, loss_agg_mode="mean")


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean"])
def test_gradient_accumulation_is_exact_for_every_aggregation(mode):
    full = update_batch(UNBALANCED)
    one = run_step([full], loss_agg_mode=mode)
    two = run_step([full.slice(0, 3), full.slice(3, 5)], loss_agg_mode=mode)
    assert_same_step(one, two)
