"""CausalLM, batched generation with a KV cache, and response log-probs."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from asyncflow.operators.generation import SamplingParams, generate, response_logprobs
from asyncflow.operators.model import CausalLM, ModelConfig, load_model, save_model
from asyncflow.operators.tensors import list_to_padded, sequences_to_list

CFG = ModelConfig(vocab_size=15, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(CFG).eval()


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def padded(rows):
    """Right-padded (B, T) long tensor and bool mask, as the operators build them."""
    return list_to_padded(sequences_to_list(rows), dtype=torch.long)


# --- (a) KV-cache decoding equals a full forward --------------------------------------------


@torch.no_grad()
def test_kv_cache_matches_full_forward_single(model):
    ids = torch.tensor([[1, 5, 3, 9, 4, 12, 7, 7, 3, 14, 2]])
    full, _ = model(ids)
    logits, past = model(ids[:, :4])
    steps = [logits]
    for t in range(4, ids.shape[1]):
        logits, past = model(ids[:, t : t + 1], past=past)
        steps.append(logits)
    incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape == (1, 11, CFG.vocab_size)
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)
    assert len(past) == CFG.n_layers
    assert past[0][0].shape == (1, CFG.n_heads, 11, CFG.d_model // CFG.n_heads)


@torch.no_grad()
def test_kv_cache_matches_full_forward_left_padded_batch(model):
    rows = [[1, 3, 4, 5, 6, 7, 8, 9], [1, 10], [1, 11, 12, 13, 14]]
    ids, mask = left_pad(rows)
    full, _ = model(ids, mask)
    prefix = 3  # row 1 is all padding but its last column within the prefix
    logits, past = model(ids[:, :prefix], mask[:, :prefix])
    steps = [logits]
    for t in range(prefix, ids.shape[1]):
        logits, past = model(ids[:, t : t + 1], mask[:, : t + 1], past)
        steps.append(logits)
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=ATOL, rtol=0)
    assert torch.isfinite(incremental).all()  # pad queries see themselves, no NaN


# --- (b) padding does not move positions -----------------------------------------------------


@torch.no_grad()
def test_left_padded_row_matches_unpadded(model):
    rows = [[1, 3, 4, 5, 6, 7], [1, 9, 8], [1, 12]]
    ids, mask = left_pad(rows)
    batch_logits, _ = model(ids, mask)
    for i, row in enumerate(rows):
        alone, _ = model(torch.tensor([row]))
        torch.testing.assert_close(batch_logits[i, -1], alone[0, -1], atol=ATOL, rtol=0)
        # Every real position, not only the last one.
        width = ids.shape[1]
        torch.testing.assert_close(batch_logits[i, width - len(row) :], alone[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_right_padded_row_matches_unpadded(model):
    rows = [[1, 3, 4, 5, 6, 7], [1, 9, 8]]
    ids, mask = padded(rows)
    batch_logits, _ = model(ids, mask.long())
    for i, row in enumerate(rows):
        alone, _ = model(torch.tensor([row]))
        torch.testing.assert_close(batch_logits[i, : len(row)], alone[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_changes_logits_without_mask(model):
    # Sanity check that the comparisons above can fail: without the mask the pad tokens
    # are attended to and shift positions, so the last-token logits differ.
    ids, mask = left_pad([[1, 3, 4, 5, 6, 7], [1, 12]])
    masked, _ = model(ids, mask)
    unmasked, _ = model(ids)
    assert (masked[1, -1] - unmasked[1, -1]).abs().max() > 1e-3


# --- (c) seeded sampling ----------------------------------------------------------------------

PROMPTS = [[1, 3, 4, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11, 12, 13, 14], [1]]
SAMPLE = SamplingParams(max_new_tokens=8, temperature=1.0, eos_id=2, pad_id=0)


def test_generation_is_reproducible_per_seed(model):
    a = generate(model, PROMPTS, SAMPLE, torch.Generator().manual_seed(123))
    b = generate(model, PROMPTS, SAMPLE, torch.Generator().manual_seed(123))
    c = generate(model, PROMPTS, SAMPLE, torch.Generator().manual_seed(124))
    assert a.responses == b.responses
    assert a.logprobs == b.logprobs
    assert a.responses != c.responses
    assert len(a.responses) == len(a.logprobs) == len(PROMPTS)
    for resp, logp in zip(a.responses, a.logprobs, strict=True):
        assert 1 <= len(resp) <= SAMPLE.max_new_tokens
        assert len(logp) == len(resp)
        assert all(0 <= tok < CFG.vocab_size for tok in resp)
        assert all(lp <= 0 for lp in logp)
        # eos only ever appears as the last token; a response without eos used the budget.
        assert SAMPLE.eos_id not in resp[:-1]
        assert resp[-1] == SAMPLE.eos_id or len(resp) == SAMPLE.max_new_tokens


def test_generate_empty_batch_and_empty_prompt(model):
    out = generate(model, [], SAMPLE)
    assert out.responses == [] and out.logprobs == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 3], []], SAMPLE)


# --- (d) reported log-probs equal recomputed ones ---------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_logprobs_match_response_logprobs(model, seed):
    out = generate(model, PROMPTS, SAMPLE, torch.Generator().manual_seed(seed))
    prompt, prompt_mask = padded(PROMPTS)
    resp, resp_mask = padded(out.responses)
    with torch.no_grad():
        recomputed = response_logprobs(model, prompt, prompt_mask, resp, resp_mask)
    assert recomputed.shape == resp.shape
    reported, _ = list_to_padded(sequences_to_list(out.logprobs, pa.float32()))
    torch.testing.assert_close(recomputed, reported, atol=1e-4, rtol=0)
    assert (recomputed[~resp_mask] == 0).all()  # padding is exactly 0


def test_response_logprobs_gradients_flow(model):
    prompt, prompt_mask = padded([[1, 3, 4], [1, 5]])
    resp, resp_mask = padded([[6, 2], [7, 8, 2]])
    logp = response_logprobs(model, prompt, prompt_mask, resp, resp_mask)
    assert logp.requires_grad
    logp.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_response_logprobs_are_next_token_log_softmax(model):
    # For one unpadded row: response token k is scored by the logits at column P + k - 1.
    prompt, response = [1, 3, 4], [6, 7, 2]
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + response]))
        expected = torch.log_softmax(logits[0], dim=-1)[[2, 3, 4], response]
        p, pm = padded([prompt])
        r, rm = padded([response])
        got = response_logprobs(model, p, pm, r, rm)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# --- (e) greedy decoding stops at eos --------------------------------------------------------

# A hand-wired model whose greedy next token depends only on the current token:
# 3 -> 4 -> 5 -> eos, 6 -> eos, and 7 -> 8 -> ... -> 14 -> 7 never reaches eos.
NEXT = {0: 0, 1: 3, 2: 2, 3: 4, 4: 5, 5: 2, 6: 2, **{t: t + 1 for t in range(7, 14)}, 14: 7}


def chain_model() -> CausalLM:
    torch.manual_seed(1)
    m = CausalLM(CFG).eval()
    with torch.no_grad():
        for block in m.blocks:  # blocks add nothing to the residual stream
            for layer in (block.attn.proj, block.mlp[2]):
                layer.weight.zero_()
                layer.bias.zero_()
        m.pos_emb.weight.zero_()
        m.tok_emb.weight.zero_()
        m.head.weight.zero_()
        for tok, nxt in NEXT.items():
            m.tok_emb.weight[tok, tok] = 1.0  # one-hot embedding
            m.head.weight[nxt, tok] = 1.0  # argmax of the logits is NEXT[tok]
    return m


def test_greedy_stops_at_eos_and_is_ragged():
    m = chain_model()
    params = SamplingParams(max_new_tokens=6, temperature=0.0, eos_id=2, pad_id=0)
    prompts = [[1, 9, 3], [1, 6], [10, 11, 12, 7], [5]]
    out = generate(m, prompts, params)
    assert out.responses == [
        [4, 5, 2],  # stops after eos
        [2],  # eos immediately
        [8, 9, 10, 11, 12, 13],  # never reaches eos: cut at max_new_tokens
        [2],
    ]
    assert [len(lp) for lp in out.logprobs] == [3, 1, 6, 1]
    # Greedy reports the log-probs of the temperature-1 distribution; they match a re-score.
    prompt, prompt_mask = padded(prompts)
    resp, resp_mask = padded(out.responses)
    with torch.no_grad():
        recomputed = response_logprobs(m, prompt, prompt_mask, resp, resp_mask)
    for i, lp in enumerate(out.logprobs):
        torch.testing.assert_close(recomputed[i, : len(lp)], torch.tensor(lp), atol=1e-5, rtol=0)


def test_greedy_with_random_model_is_deterministic(model):
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    a = generate(model, PROMPTS, params, torch.Generator().manual_seed(1))
    b = generate(model, PROMPTS, params, torch.Generator().manual_seed(2))
    assert a.responses == b.responses  # the generator is irrelevant when greedy


# --- (f) safetensors round trip ---------------------------------------------------------------


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "policy.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.cfg == CFG
    ids, mask = left_pad([[1, 3, 4, 5], [1, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids, mask)[0], loaded.eval()(ids, mask)[0])
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_load_model_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not an asyncflow model file"):
        load_model(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="asyncflow_model_config"):
        load_model(other)


def test_model_config_json_round_trip():
    assert ModelConfig.from_json(CFG.to_json()) == CFG


# --- (g) max_seq_len ------------------------------------------------------------------------


def test_forward_beyond_max_seq_len_raises(model):
    with torch.no_grad():
        model(torch.ones(1, CFG.max_seq_len, dtype=torch.long))  # exactly at the limit is fine
        with pytest.raises(ValueError, match="17 tokens exceeds max_seq_len 16"):
            model(torch.ones(1, CFG.max_seq_len + 1, dtype=torch.long))


def test_left_padding_does_not_count_towards_max_seq_len(model):
    # 20 columns but only 10 real tokens: positions count real tokens, so this is allowed.
    ids = torch.ones(1, 20, dtype=torch.long)
    mask = torch.zeros(1, 20, dtype=torch.long)
    mask[:, 10:] = 1
    with torch.no_grad():
        logits, _ = model(ids, mask)
    assert torch.isfinite(logits).all()


def test_generation_beyond_max_seq_len_raises(model):
    params = SamplingParams(max_new_tokens=8, temperature=0.0, eos_id=-1)  # never stops early
    # 10 prompt tokens + 7 fed-back tokens = 17 positions > 16
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 10], params)
    # 9 + 7 = 16 positions: fits exactly
    assert len(generate(model, [[1] * 9], params).responses[0]) == 8
