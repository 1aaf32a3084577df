"""Sampling: top-k / top-p filtering, n samples per prompt, entropies, and KV-cache decoding
checked against a sampler that recomputes the full forward every step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asyncflow.operators.generation import (
    SamplingParams,
    entropy_from_logp,
    generate,
    response_logprobs,
    top_k_top_p_filter,
)
from asyncflow.operators.model import CausalLM, ModelConfig
from asyncflow.operators.tensors import list_to_padded, sequences_to_list

CFG = ModelConfig(vocab_size=15, d_model=32, n_layers=2, n_heads=4, max_seq_len=24)
PROMPTS = [[1, 3, 4, 5, 6], [1, 7], [1, 8, 9, 10], [1]]
INF = float("-inf")


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(CFG).eval()


def padded(rows):
    return list_to_padded(sequences_to_list(rows), dtype=torch.long)


# --- top-k / top-p ----------------------------------------------------------------------------
# probabilities [0.1, 0.4, 0.2, 0.3] (as logits: their logs)
PROBS = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest():
    assert kept(top_k_top_p_filter(LOGITS, top_k=2)) == [1, 3]  # 0.4 and 0.3
    assert kept(top_k_top_p_filter(LOGITS, top_k=1)) == [1]
    assert kept(top_k_top_p_filter(LOGITS, top_k=0)) == [0, 1, 2, 3]  # 0 = off
    assert kept(top_k_top_p_filter(LOGITS, top_k=9)) == [0, 1, 2, 3]  # k >= V = off
    # the kept logits are unchanged (renormalisation is the softmax's job)
    assert top_k_top_p_filter(LOGITS, top_k=2)[0, 1] == LOGITS[0, 1]


def test_top_k_keeps_ties():
    assert kept(top_k_top_p_filter(torch.tensor([[1.0, 1.0, 0.0]]), top_k=1)) == [0, 1]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # sorted: 0.4, 0.3, 0.2, 0.1; mass of strictly more likely tokens: 0, 0.4, 0.7, 0.9
    # top_p = 0.5: 0.4 < 0.5 so the first token alone is not enough; keep {0.4, 0.3} (0.7)
    assert kept(top_k_top_p_filter(LOGITS, top_p=0.5)) == [1, 3]
    assert kept(top_k_top_p_filter(LOGITS, top_p=0.35)) == [1]  # 0.4 >= 0.35
    assert kept(top_k_top_p_filter(LOGITS, top_p=0.75)) == [1, 2, 3]  # 0.4 + 0.3 < 0.75
    assert kept(top_k_top_p_filter(LOGITS, top_p=1.0)) == [0, 1, 2, 3]
    assert kept(top_k_top_p_filter(LOGITS, top_p=1e-9)) == [1]  # always at least one


def test_top_p_applies_after_top_k_on_the_renormalised_distribution():
    # top_k = 3 drops 0.1; renormalised [0.4, 0.3, 0.2] / 0.9 = [0.444, 0.333, 0.222]
    # top_p = 0.7: masses before 0, 0.444, 0.778 -> keep 0.444 and 0.333 (index 1, 3).
    # Without top-k, 0.4 + 0.3 = 0.7 of the raw mass would also reach 0.7, so use 0.72:
    # raw: masses before 0, 0.4, 0.7 (< 0.72) -> keep 3 tokens; after top-k: keep 2.
    assert kept(top_k_top_p_filter(LOGITS, top_p=0.72)) == [1, 2, 3]
    assert kept(top_k_top_p_filter(LOGITS, top_k=3, top_p=0.72)) == [1, 3]


def test_filter_works_row_by_row():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    out = top_k_top_p_filter(logits, top_k=1)
    assert out.isfinite().tolist() == [[False, False, True], [True, False, False]]


def test_entropy_from_logp_ignores_zero_probability_tokens():
    # p = [0.5, 0.5, 0]: H = ln 2; the -inf logit adds 0 (not NaN)
    logp = torch.tensor([[math.log(0.5), math.log(0.5), INF]])
    assert entropy_from_logp(logp).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"n": 0}, "n .samples per prompt. must be >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_positional_order_is_unchanged():
    # workflows build SamplingParams(max_new_tokens, temperature, eos_id, pad_id) positionally
    p = SamplingParams(5, 0.7, 2, 0)
    assert (p.max_new_tokens, p.temperature, p.eos_id, p.pad_id) == (5, 0.7, 2, 0)
    assert (p.top_k, p.top_p, p.n) == (0, 1.0, 1)


# --- KV-cache sampling == full-forward sampling, reproducible by seed -------------------------


@torch.no_grad()
def sample_without_cache(model, prompts, params, generator):
    """Reference: every step re-runs the whole left-padded sequence (no KV cache)."""
    rows = [list(p) for p in prompts for _ in range(params.n)]
    out, logps = [[] for _ in rows], [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(params.max_new_tokens):
        seqs = [r + o for r, o in zip(rows, out, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        logits, _ = model(ids, mask)
        scaled = logits[:, -1].float() / params.temperature
        policy = F.log_softmax(scaled, dim=-1)
        probs = F.softmax(top_k_top_p_filter(scaled, params.top_k, params.top_p), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        for i in range(len(rows)):
            if not done[i]:
                out[i].append(int(nxt[i]))
                logps[i].append(float(policy[i, nxt[i]]))
                done[i] = int(nxt[i]) == params.eos_id
        if all(done):
            break
    return out, logps


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=7, temperature=1.0, top_k=4),
        SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.7),
        SamplingParams(max_new_tokens=7, temperature=1.3, top_k=6, top_p=0.9, n=2),
    ],
    ids=["top_k", "top_p", "both_n2"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_kv_cache_sampling_matches_full_forward(model, params, seed):
    fast = generate(model, PROMPTS, params, torch.Generator().manual_seed(seed))
    slow, slow_logp = sample_without_cache(
        model, PROMPTS, params, torch.Generator().manual_seed(seed)
    )
    assert fast.responses == slow
    for a, b in zip(fast.logprobs, slow_logp, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    again = generate(model, PROMPTS, params, torch.Generator().manual_seed(seed))
    assert again.responses == fast.responses and again.logprobs == fast.logprobs


def test_different_seeds_differ(model):
    params = SamplingParams(max_new_tokens=7, top_k=8, top_p=0.95)
    a = generate(model, PROMPTS, params, torch.Generator().manual_seed(5))
    b = generate(model, PROMPTS, params, torch.Generator().manual_seed(6))
    assert a.responses != b.responses


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
    for params in (
        SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1),
        SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6),
    ):
        out = generate(model, PROMPTS, params, torch.Generator().manual_seed(0))
        assert out.responses == greedy.responses


def test_sampled_tokens_stay_inside_top_k(model):
    # Re-score each sampled token: its rank under the model's next-token distribution is < k.
    params = SamplingParams(max_new_tokens=6, top_k=3)
    out = generate(model, PROMPTS * 4, params, torch.Generator().manual_seed(2))
    prompts, responses = PROMPTS * 4, out.responses
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            logits, _ = model(torch.tensor([p + r]))
            step = logits[0, len(p) - 1 : len(p) - 1 + len(r)]  # (len(r), V)
            ranks = (step > step.gather(1, torch.tensor(r)[:, None])).sum(dim=1)
            assert (ranks < 3).all()


# --- n samples per prompt ---------------------------------------------------------------------


def test_n_samples_are_grouped_by_prompt(model):
    params = SamplingParams(max_new_tokens=6, n=3)
    out = generate(model, PROMPTS, params, torch.Generator().manual_seed(4))
    assert len(out.responses) == len(out.logprobs) == 3 * len(PROMPTS)
    # the same as sampling the prompts repeated in place, prompt 0 x 3, prompt 1 x 3, ...
    repeated = [p for p in PROMPTS for _ in range(3)]
    ref = generate(
        model, repeated, SamplingParams(max_new_tokens=6), torch.Generator().manual_seed(4)
    )
    assert out.responses == ref.responses
    # and the log-probs re-score under each row's own prompt
    prompt, prompt_mask = padded(repeated)
    resp, resp_mask = padded(out.responses)
    with torch.no_grad():
        rescored = response_logprobs(model, prompt, prompt_mask, resp, resp_mask)
    for i, lp in enumerate(out.logprobs):
        assert rescored[i, : len(lp)].tolist() == pytest.approx(lp, abs=1e-4)
    groups = [out.responses[3 * i : 3 * i + 3] for i in range(len(PROMPTS))]
    assert any(len({tuple(r) for r in g}) > 1 for g in groups)  # samples within a group vary


# --- entropies --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generation_entropy_matches_rescored_entropy(model, temperature):
    params = SamplingParams(max_new_tokens=6, temperature=temperature)
    out = generate(model, PROMPTS, params, torch.Generator().manual_seed(0), return_entropy=True)
    assert [len(e) for e in out.entropies] == [len(r) for r in out.responses]
    prompt, prompt_mask = padded(PROMPTS)
    resp, resp_mask = padded(out.responses)
    with torch.no_grad():
        logp, entropy = response_logprobs(
            model, prompt, prompt_mask, resp, resp_mask, temperature, return_entropy=True
        )
    assert (entropy[~resp_mask] == 0).all()
    for i, (lp, ent) in enumerate(zip(out.logprobs, out.entropies, strict=True)):
        assert logp[i, : len(lp)].tolist() == pytest.approx(lp, abs=1e-4)
        assert entropy[i, : len(ent)].tolist() == pytest.approx(ent, abs=1e-4)
        assert all(0 <= e <= math.log(CFG.vocab_size) + 1e-5 for e in ent)


def test_entropy_is_off_by_default(model):
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=3)).entropies is None


def test_truncated_logprobs_report_the_sampled_distribution(model):
    # top_k = 1 with truncated log-probs: the sampling distribution is one-hot, so every
    # reported log-prob and entropy is 0; the default reports the tempered policy (< 0).
    params = SamplingParams(max_new_tokens=5, top_k=1, truncated_logprobs=True)
    out = generate(model, PROMPTS, params, torch.Generator().manual_seed(0), return_entropy=True)
    assert all(lp == 0.0 for row in out.logprobs for lp in row)
    assert all(e == 0.0 for row in out.entropies for e in row)
    plain = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, top_k=1))
    assert plain.responses == out.responses
    assert all(lp < 0 for row in plain.logprobs for lp in row)


def test_response_logprobs_entropy_gradients_flow(model):
    prompt, prompt_mask = padded([[1, 3, 4], [1, 5]])
    resp, resp_mask = padded([[6, 2], [7, 8, 2]])
    _, entropy = response_logprobs(model, prompt, prompt_mask, resp, resp_mask, return_entropy=True)
    entropy.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_response_logprobs_rejects_empty_prompts(model):
    prompt, prompt_mask = padded([[1, 3], []])
    resp, resp_mask = padded([[4], [5]])
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty prompt"):
        response_logprobs(model, prompt, prompt_mask, resp, resp_mask)


def test_hidden_states_feed_the_lm_head(model):
    ids, mask = padded([[1, 3, 4, 5], [1, 6]])
    with torch.no_grad():
        logits, _ = model(ids, mask.long())
        hidden = model.hidden_states(ids, mask.long())
    assert hidden.shape == (2, 4, CFG.d_model) and model.hidden_size == CFG.d_model
    torch.testing.assert_close(model.head(hidden), logits)
