"""The transformers adapter: a tiny Qwen2 built from a config and a byte-level tokenizer made
in code (nothing downloaded) run through Generate, LogProb, PolicyUpdate, Values, Reward."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

transformers = pytest.importorskip("transformers")

from asyncflow.operators.base import OperatorContext  # noqa: E402
from asyncflow.operators.generation import SamplingParams, generate, response_logprobs  # noqa: E402
from asyncflow.operators.heads import HeadSpec  # noqa: E402
from asyncflow.operators.hf import (  # noqa: E402
    HFCausalLM,
    HFModelSpec,
    HFTokenizer,
    byte_level_tokenizer,
)
from asyncflow.operators.model import CausalLMLike  # noqa: E402
from asyncflow.operators.rollout import Generate  # noqa: E402
from asyncflow.operators.scoring import LogProb, Reward, Values  # noqa: E402
from asyncflow.operators.tensors import list_to_padded, sequences_to_list  # noqa: E402
from asyncflow.operators.update import OptimConfig, PolicyUpdate  # noqa: E402
from asyncflow.runtime.contracts import check_output  # noqa: E402

ATOL = 1e-5
QWEN = transformers.Qwen2Config(
    vocab_size=259,  # the byte tokenizer: 3 specials + 256 bytes
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
SPEC = HFModelSpec(config=QWEN)
I32 = pa.list_(pa.int32())


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer(byte_level_tokenizer())


@pytest.fixture(scope="module")
def lm() -> HFCausalLM:
    return SPEC.build(seed=0).eval()


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def padded(rows):
    return list_to_padded(sequences_to_list(rows), dtype=torch.long)


# --- tokenizer --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_any_text(tok):
    assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "1+2=3 héllo ☃"
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.encode("a", bos=True, eos=True) == [1, ord("a") + 3, 2]
    # decode stops at eos and drops specials, like CharTokenizer
    assert tok.decode([*tok.encode("ab"), 2, *tok.encode("cd")]) == "ab"
    assert tok.decode([1, *tok.encode("x"), 0]) == "x"
    assert tok.decode([]) == ""


# --- the adapter satisfies the protocol and agrees with itself across layouts -----------------


def test_adapter_is_a_causal_lm_like(lm):
    assert isinstance(lm, CausalLMLike)
    assert lm.hidden_size == 32


@torch.no_grad()
def test_kv_cache_matches_full_forward_left_padded(lm):
    rows = [[1, 40, 41, 42, 43, 44, 45], [1, 50], [1, 60, 61, 62]]
    ids, mask = left_pad(rows)
    full, _ = lm(ids, mask)
    prefix = 3
    logits, past = lm(ids[:, :prefix], mask[:, :prefix])
    steps = [logits]
    for t in range(prefix, ids.shape[1]):
        logits, past = lm(ids[:, t : t + 1], mask[:, : t + 1], past)
        steps.append(logits)
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=ATOL, rtol=0)
    assert torch.isfinite(incremental[real]).all()


@torch.no_grad()
def test_padding_does_not_move_positions(lm):
    rows = [[1, 40, 41, 42, 43], [1, 50]]
    left_ids, left_mask = left_pad(rows)
    right_ids, right_mask = padded(rows)
    left, _ = lm(left_ids, left_mask)
    right, _ = lm(right_ids, right_mask.long())
    for i, row in enumerate(rows):
        alone, _ = lm(torch.tensor([row]))
        width = left_ids.shape[1]
        torch.testing.assert_close(left[i, width - len(row) :], alone[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(right[i, : len(row)], alone[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_hidden_states_feed_the_lm_head(lm):
    ids, mask = padded([[1, 40, 41], [1, 50]])
    logits, _ = lm(ids, mask.long())
    hidden = lm.hidden_states(ids, mask.long())
    torch.testing.assert_close(lm.hf.get_output_embeddings()(hidden), logits)


# --- sampling and scoring through the adapter -------------------------------------------------

PROMPTS = [[1, *(b + 3 for b in b"1+2=")], [1, *(b + 3 for b in b"12+9=")], [1, 40]]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=6, top_k=20, top_p=0.9),
        SamplingParams(max_new_tokens=6, temperature=0.8, n=2),
    ],
)
def test_generate_with_kv_cache_matches_rescoring(lm, params):
    a = generate(lm, PROMPTS, params, torch.Generator().manual_seed(3), return_entropy=True)
    b = generate(lm, PROMPTS, params, torch.Generator().manual_seed(3), return_entropy=True)
    assert a.responses == b.responses and a.logprobs == b.logprobs  # reproducible by seed
    rows = [p for p in PROMPTS for _ in range(params.n)]
    prompt, prompt_mask = padded(rows)
    resp, resp_mask = padded(a.responses)
    with torch.no_grad():
        logp, entropy = response_logprobs(
            lm, prompt, prompt_mask, resp, resp_mask, params.temperature, return_entropy=True
        )
    for i, (lp, ent) in enumerate(zip(a.logprobs, a.entropies, strict=True)):
        assert logp[i, : len(lp)].tolist() == pytest.approx(lp, abs=1e-4)
        assert entropy[i, : len(ent)].tolist() == pytest.approx(ent, abs=1e-4)


def prompt_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "sample_id": pa.array(range(len(PROMPTS)), pa.int64()),
            "prompt_ids": pa.array(PROMPTS, I32),
        }
    )


def test_generate_logprob_and_policy_update_operators(tok):
    sampling = SamplingParams(max_new_tokens=5, eos_id=tok.eos_id, pad_id=tok.pad_id, top_k=50)
    rollout = Generate(SPEC, sampling)
    rollout.setup(OperatorContext(name="rollout", seed=1))
    gen = check_output("rollout", rollout.writes, rollout(prompt_batch()), [0, 1, 2])

    ref = LogProb(SPEC)  # same spec and seed: same weights as the rollout
    ref.setup(OperatorContext(name="ref", seed=1))
    batch = pa.RecordBatch.from_arrays(
        [prompt_batch().column("prompt_ids"), gen.column("response_ids")],
        names=["prompt_ids", "response_ids"],
    )
    scored = check_output("ref", ref.writes, ref(batch), [0, 1, 2])
    for r, g in zip(
        scored.column("ref_logprob").to_pylist(),
        gen.column("rollout_logprob").to_pylist(),
        strict=True,
    ):
        assert r == pytest.approx(g, abs=1e-4)

    actor = PolicyUpdate(SPEC, optim=OptimConfig(lr=1e-3), entropy_coef=0.01)
    actor.setup(OperatorContext(name="actor", seed=1))
    train = pa.RecordBatch.from_pydict(
        {
            "sample_id": pa.array([0, 1, 2], pa.int64()),
            "prompt_ids": pa.array(PROMPTS, I32),
            "response_ids": gen.column("response_ids"),
            "rollout_logprob": gen.column("rollout_logprob"),
            "advantage": pa.array([1.0, -1.0, 0.5], pa.float32()),
        }
    )
    assert actor(train) == {}
    metrics = actor.end_step(0)
    # on-policy: ratio 1 everywhere, nothing clipped
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["actor/clip_frac"] == 0.0
    assert metrics["actor/entropy"] > 0
    version, weights = actor.get_weights()
    assert version == 1
    rollout.set_weights(version, weights)  # weight sync: the rollout now samples the new policy
    assert rollout(prompt_batch())["policy_version"].to_pylist() == [1, 1, 1]
    _, before = ref.get_weights()
    assert any(not torch.equal(before[k], weights[k]) for k in weights)


def test_value_head_on_a_transformers_trunk():
    critic = Values(HeadSpec(SPEC, kind="value"))
    critic.setup(OperatorContext(name="values", seed=0))
    batch = pa.RecordBatch.from_pydict(
        {"prompt_ids": pa.array(PROMPTS, I32), "response_ids": pa.array([[50, 2], [], [60]], I32)}
    )
    out = check_output("values", critic.writes, critic(batch), [0, 1, 2])
    assert [len(v) for v in out.column("values").to_pylist()] == [2, 0, 1]


def test_reward_decodes_with_the_transformers_tokenizer(tok):
    seen = []

    def exact(prompts, completions, **kwargs):
        seen.append((list(prompts), list(completions)))
        return [1.0 if c == "3" else 0.0 for c in completions]

    op = Reward({"exact": exact}, tok)
    op.setup(OperatorContext(name="reward"))
    batch = pa.RecordBatch.from_pydict(
        {
            "prompt_ids": pa.array([tok.encode("1+2=", bos=True)] * 3, I32),
            "response_ids": pa.array(
                [tok.encode("3", eos=True), tok.encode("4", eos=True), []], I32
            ),
        }
    )
    assert op(batch)["reward"].to_pylist() == [1.0, 0.0, 0.0]
    assert seen == [(["1+2="] * 3, ["3", "4", ""])]


def test_spec_from_a_local_directory(tmp_path, lm):
    lm.hf.save_pretrained(tmp_path)
    loaded = HFModelSpec(path=str(tmp_path)).build()
    ids, mask = padded([[1, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids, mask.long())[0], lm(ids, mask.long())[0])
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        HFModelSpec(path=str(tmp_path / "missing")).build()
    with pytest.raises(ValueError, match="exactly one of config= or path="):
        HFModelSpec()


def test_specs_pickle_for_dask(tok):
    import pickle

    op = Generate(SPEC, SamplingParams(eos_id=tok.eos_id))
    clone = pickle.loads(pickle.dumps(op))
    clone.setup(OperatorContext(name="rollout", seed=0))
    assert isinstance(clone.model, HFCausalLM)
