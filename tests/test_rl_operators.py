"""RL operators called in-process (no Dask): advantage estimators as operators, GAE, the
extended PolicyUpdate (entropy, dual-clip, decoupled IS, token advantages, LR schedule),
CriticUpdate / Values, ModelReward, SFTUpdate, and every bad-input case."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from asyncflow.errors import OperatorError
from asyncflow.operators.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae_advantages,
    outcome_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)
from asyncflow.operators.base import OperatorContext
from asyncflow.operators.estimate import GAEAdvantage, GroupAdvantage
from asyncflow.operators.generation import SamplingParams, response_logprobs
from asyncflow.operators.heads import HeadSpec, RewardModel, ValueModel, save_head
from asyncflow.operators.losses import (
    aggregate,
    decoupled_ppo_token_loss,
    ppo_clip_token_loss,
    value_clip_loss,
)
from asyncflow.operators.model import ModelConfig
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.rollout import Generate
from asyncflow.operators.scoring import LogProb, ModelReward, Reward, Values
from asyncflow.operators.sft import SFTUpdate
from asyncflow.operators.tensors import list_to_padded
from asyncflow.operators.tokenizer import CharTokenizer
from asyncflow.operators.training import OptimConfig, lr_factor
from asyncflow.operators.update import CriticUpdate, PolicyUpdate
from asyncflow.runtime.contracts import check_output

TOK = CharTokenizer("0123456789+=")
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
SPEC = ModelSpec(CFG)
VALUE = HeadSpec(SPEC, kind="value")
REWARD = HeadSpec(SPEC, kind="reward")
I32 = pa.list_(pa.int32())
F32 = pa.list_(pa.float32())
SMALL_LR = OptimConfig(lr=1e-4)


def ready(op, name: str = "op", seed: int = 0):
    op.setup(OperatorContext(name=name, seed=seed))
    return op


def ids_col(ids) -> pa.Array:
    return pa.array(list(ids), pa.int64())


def f32_lists(rows) -> pa.Array:
    return pa.array([[float(x) for x in r] for r in rows], F32)


# --- GroupAdvantage: every per-sample estimator -----------------------------------------------

REWARDS = [1.0, 2.0, 0.0, 4.0, 1.0, 6.0]
GROUPS = [7, 3, 7, 3, 7, 3]
RESPONSES = [[3, 4, 2], [5, 2], [6], [7, 8, 9, 2], [], [10, 11, 2]]  # row 4 is empty


def reward_batch(rewards=REWARDS) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col(range(100, 106)),
            "reward": pa.array(rewards, pa.float32()),
            "group_id": pa.array(GROUPS, pa.int64()),
            "response_ids": pa.array(RESPONSES, I32),
        }
    )


def test_group_advantage_rloo():
    op = GroupAdvantage(estimator="rloo")
    assert op.reads == {"reward": "float32", "group_id": "int64"} and op.needs_whole_groups
    out = check_output("advantage", op.writes, op(reward_batch()), list(range(100, 106)))
    # group 7 [1, 0, 1]: 1 - (0+1)/2 = 0.5, 0 - 1 = -1; group 3 [2, 4, 6]: 2-5, 4-4, 6-3
    assert out.column("advantage").to_pylist() == pytest.approx([0.5, -3.0, -1.0, 0.0, 0.5, 3.0])
    expected = rloo_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS))
    assert out.column("advantage").to_pylist() == pytest.approx(expected.tolist())


def test_group_advantage_reinforce_pp_whitens_over_tokens():
    op = GroupAdvantage(estimator="reinforce_pp")
    assert op.reads == {"reward": "float32", "response_ids": "list<int32>"}
    assert not op.needs_whole_groups  # no group baseline: batch whitening only
    got = op(reward_batch())["advantage"].to_pylist()
    # Token-level: each reward repeated over its response's tokens (gamma 1), whitened over
    # the 13 real tokens; the empty response (row 4) has no token and gets 0.
    _, mask = list_to_padded(pa.array(RESPONSES, I32))
    adv, _ = reinforce_pp_advantages(outcome_token_rewards(torch.tensor(REWARDS), mask), mask)
    lengths = [len(r) for r in RESPONSES]
    tokens = [v for r, n in zip(REWARDS, lengths, strict=True) for v in [r] * n]
    mean, std = np.mean(tokens), np.std(tokens, ddof=1)
    for i, n in enumerate(lengths):
        if n:
            assert got[i] == pytest.approx((REWARDS[i] - mean) / std, abs=1e-5)
            assert adv[i, :n].tolist() == pytest.approx([got[i]] * n, abs=1e-6)
    assert got[4] == 0.0


def test_group_advantage_drgrpo_alias_and_errors():
    a = GroupAdvantage(normalize_std=False)(reward_batch())["advantage"]
    b = GroupAdvantage(estimator="drgrpo")(reward_batch())["advantage"]
    assert a.equals(b)
    with pytest.raises(ValueError, match="per-token: use GAEAdvantage"):
        GroupAdvantage(estimator="gae")
    with pytest.raises(ValueError, match="unknown per-sample estimator 'ppo'"):
        GroupAdvantage(estimator="ppo")
    with pytest.raises(ValueError, match=r"takes options \['eps'\], not \['gamma'\]"):
        GroupAdvantage(estimator="grpo", options={"gamma": 0.9})


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "reinforce_pp"])
def test_group_advantage_nan_reward_names_samples(estimator):
    op = ready(GroupAdvantage(estimator=estimator), "advantage")
    with pytest.raises(OperatorError) as info:
        op(reward_batch([1.0, math.nan, 0.0, 4.0, math.inf, 6.0]))
    assert info.value.operator == "advantage"
    assert info.value.sample_ids == [101, 104]
    assert "column 'reward' holds NaN/inf" in str(info.value)


# --- GAEAdvantage -----------------------------------------------------------------------------


def gae_batch(values=None, **extra) -> pa.RecordBatch:
    # the 2 x 4 example of test_advantages.py::test_gae_hand_computed_2x4
    return pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col([10, 11]),
            "reward": pa.array([1.0, -1.0], pa.float32()),
            "values": f32_lists(values or [[0.5, 1.0, -0.5, 2.0], [1.0, 0.5]]),
            "response_ids": pa.array([[3, 4, 5, 2], [6, 2]], I32),
            **extra,
        }
    )


def test_gae_operator_hand_computed():
    op = ready(GAEAdvantage(gamma=0.9, lam=0.8), "gae")
    out = check_output("gae", op.writes, op(gae_batch()), [10, 11])
    adv = out.column("advantages").to_pylist()
    ret = out.column("returns").to_pylist()
    assert adv[0] == pytest.approx([0.175072, -0.3124, 1.58, -1.0], abs=1e-6)
    assert adv[1] == pytest.approx([-1.63, -1.5], abs=1e-6)
    assert ret[0] == pytest.approx([0.675072, 0.6876, 1.08, 1.0], abs=1e-6)
    assert ret[1] == pytest.approx([-0.63, -1.0], abs=1e-6)


def test_gae_operator_kl_in_reward():
    op = ready(GAEAdvantage(gamma=1.0, lam=1.0, kl_coef=0.5), "gae")
    assert {"rollout_logprob", "ref_logprob"} <= op.reads.keys()
    # lam = gamma = 1: A_t = sum of rewards from t on - V_t. Row 1: k1 = [0.2, -0.4],
    # token rewards [0 - 0.1, -1 + 0.2] = [-0.1, -0.8]; A = [-0.9 - 1.0, -0.8 - 0.5]
    batch = gae_batch(
        rollout_logprob=f32_lists([[-1.0] * 4, [-1.0, -2.0]]),
        ref_logprob=f32_lists([[-1.0] * 4, [-1.2, -1.6]]),
    )
    adv = op(batch)["advantages"].to_pylist()
    assert adv[1] == pytest.approx([-1.9, -1.3], abs=1e-6)
    assert adv[0] == pytest.approx([1 - 0.5, 1 - 1.0, 1 + 0.5, 1 - 2.0], abs=1e-6)


def test_gae_operator_rejects_misaligned_values_and_nan():
    op = ready(GAEAdvantage(), "gae")
    with pytest.raises(OperatorError) as info:
        op(gae_batch(values=[[0.5, 1.0, -0.5, 2.0], [1.0]]))
    assert info.value.sample_ids == [11]
    assert "column 'values' has 1 items where 'response_ids' has 2" in str(info.value)
    with pytest.raises(OperatorError, match="'values' holds NaN/inf") as info:
        op(gae_batch(values=[[0.5, math.nan, -0.5, 2.0], [1.0, 0.5]]))
    assert info.value.sample_ids == [10]


# --- PolicyUpdate extensions ------------------------------------------------------------------

PROMPTS = [[1, 4, 13, 5, 14], [1, 5, 13], [1, 6, 7], [1, 9], [1, 3], [1, 4, 4], [1, 10], [1, 11]]
RESP = [[3, 4, 2], [5, 2, 3, 3, 3], [6], [7, 8, 9, 2], [3, 2], [4, 4, 2], [9, 9], [10, 11, 2]]


def update_batch(responses=RESP, **extra_columns) -> pa.RecordBatch:
    rng = np.random.default_rng(0)

    def lp(scale=1.0):
        return f32_lists([-rng.uniform(0.5, 4.0, len(r)) * scale for r in responses])

    columns = {
        "sample_id": ids_col(range(len(responses))),
        "prompt_ids": pa.array(PROMPTS[: len(responses)], I32),
        "response_ids": pa.array(responses, I32),
        "rollout_logprob": lp(),
        "prox_logprob": lp(),
        "ref_logprob": lp(),
        "advantage": pa.array(np.linspace(-1.5, 1.0, len(responses)), pa.float32()),
        "advantages": f32_lists([rng.normal(size=len(r)) for r in responses]),
    }
    columns.update(extra_columns)
    return pa.RecordBatch.from_pydict(columns)


def run_step(op, batches):
    before = {k: v.clone() for k, v in op.model.state_dict().items()}
    for b in batches:
        assert op(b) == {}
    grads = {n: p.grad.clone() for n, p in op.model.named_parameters() if p.grad is not None}
    metrics = op.end_step(0)
    after = op.model.state_dict()
    return grads, {k: after[k] - before[k] for k in before}, metrics


def assert_same_step(one, two):
    assert one[0].keys() == two[0].keys()
    for name in one[0]:
        torch.testing.assert_close(two[0][name], one[0][name], atol=1e-6, rtol=1e-5)
    for name in one[1]:
        torch.testing.assert_close(two[1][name], one[1][name], atol=1e-6, rtol=0)


FULL_OPTIONS = {
    "entropy_coef": 0.01,
    "clip_ratio_c": 3.0,
    "clip_eps_high": 0.28,
    "policy_loss": "decoupled_ppo",
    "is_cap": 1.5,
    "token_advantages": True,
    "kl_coef": 0.1,
}


def test_policy_update_reads_follow_the_loss_registry():
    assert "prox_logprob" not in PolicyUpdate(SPEC).reads
    op = PolicyUpdate(SPEC, policy_loss="decoupled_ppo", token_advantages=True)
    assert op.reads["prox_logprob"] == "list<float32>"
    assert op.reads["advantages"] == "list<float32>" and "advantage" not in op.reads
    assert PolicyUpdate(SPEC, policy_loss="decoupled_ppo", prox_column="prox").reads["prox"]
    with pytest.raises(ValueError, match="unknown policy_loss 'grpo'"):
        PolicyUpdate(SPEC, policy_loss="grpo")
    with pytest.raises(ValueError, match="unknown kl_estimator 'k9'"):
        PolicyUpdate(SPEC, kl_estimator="k9")
    with pytest.raises(ValueError, match="unknown is_mode 'drop'"):
        PolicyUpdate(SPEC, policy_loss="decoupled_ppo", is_mode="drop")
    with pytest.raises(ValueError, match="clip_ratio_c > 1"):
        PolicyUpdate(SPEC, clip_ratio_c=0.5)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_accumulation_is_exact_with_every_extension(mode):
    full = update_batch()
    kwargs = dict(FULL_OPTIONS, loss_agg_mode=mode, optim=SMALL_LR)
    one = run_step(ready(PolicyUpdate(SPEC, **kwargs), "actor"), [full])
    two = run_step(
        ready(PolicyUpdate(SPEC, **kwargs), "actor"), [full.slice(0, 3), full.slice(3, 5)]
    )
    assert_same_step(one, two)
    for key in ("actor/pg_loss", "actor/entropy", "actor/is_weight", "actor/dual_clip_frac"):
        assert two[2][key] == pytest.approx(one[2][key], abs=1e-6)


def test_policy_update_gradient_matches_direct_loss_with_every_extension():
    full = update_batch()
    op = ready(PolicyUpdate(SPEC, **FULL_OPTIONS, optim=SMALL_LR), "actor")
    grads, _, metrics = run_step(op, [full])

    model = SPEC.build(seed=0)
    model.train()
    prompt, prompt_mask = list_to_padded(full.column("prompt_ids"), dtype=torch.long)
    resp, mask = list_to_padded(full.column("response_ids"), dtype=torch.long)
    col = {n: list_to_padded(full.column(n))[0] for n in ("rollout_logprob", "prox_logprob")}
    adv, _ = list_to_padded(full.column("advantages"))
    ref, _ = list_to_padded(full.column("ref_logprob"))
    logp, entropy = response_logprobs(model, prompt, prompt_mask, resp, mask, return_entropy=True)
    token_loss, stats = decoupled_ppo_token_loss(
        logp,
        col["prox_logprob"],
        col["rollout_logprob"],
        adv,
        0.2,
        clip_eps_high=0.28,
        clip_ratio_c=3.0,
        is_cap=1.5,
    )
    neg = ref - logp  # k3 = exp(ref - logp) - 1 - (ref - logp)
    kl = torch.exp(neg) - 1 - neg
    loss = aggregate(token_loss, mask) + 0.1 * aggregate(kl, mask) - 0.01 * aggregate(entropy, mask)
    loss.backward()
    tokens = float(mask.sum())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name] / tokens, p.grad, atol=1e-7, rtol=1e-5)
    assert metrics["actor/pg_loss"] == pytest.approx(aggregate(token_loss, mask).item(), abs=1e-6)
    m = mask.float()
    assert metrics["actor/entropy"] == pytest.approx(
        float((entropy.detach() * m).sum() / m.sum()), rel=1e-5
    )
    capped = float((stats["actor/is_capped_frac"] * m).sum() / m.sum())
    assert metrics["actor/is_capped_frac"] == pytest.approx(capped, abs=1e-6)
    assert 0 < capped < 1  # the cap binds on some tokens of this batch


def test_dual_clip_changes_the_update():
    full = update_batch()
    plain = run_step(ready(PolicyUpdate(SPEC, optim=SMALL_LR), "actor"), [full])
    dual = run_step(ready(PolicyUpdate(SPEC, optim=SMALL_LR, clip_ratio_c=1.5), "actor"), [full])
    # random old log-probs give huge ratios: dual-clip zeroes the gradient of those tokens
    assert dual[2]["actor/dual_clip_frac"] > 0
    assert dual[2]["actor/pg_loss"] < plain[2]["actor/pg_loss"]
    assert not torch.allclose(dual[0]["head.weight"], plain[0]["head.weight"])


def test_ppo_with_scalar_advantages_is_unchanged_by_defaults():
    # the default PolicyUpdate is exactly the PPO-clip update it always was
    full = update_batch()
    grads, _, _ = run_step(ready(PolicyUpdate(SPEC, optim=SMALL_LR), "actor"), [full])
    model = SPEC.build(seed=0).train()
    prompt, prompt_mask = list_to_padded(full.column("prompt_ids"), dtype=torch.long)
    resp, mask = list_to_padded(full.column("response_ids"), dtype=torch.long)
    old, _ = list_to_padded(full.column("rollout_logprob"))
    adv = torch.tensor(full.column("advantage").to_numpy())
    logp = response_logprobs(model, prompt, prompt_mask, resp, mask)
    token_loss, _ = ppo_clip_token_loss(logp, old, adv)
    (token_loss * mask).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("column", "bad_rows"),
    [("rollout_logprob", [2]), ("prox_logprob", [5]), ("advantages", [0, 7]), ("ref_logprob", [3])],
)
def test_policy_update_rejects_misaligned_columns(column, bad_rows):
    op = ready(PolicyUpdate(SPEC, **FULL_OPTIONS), "actor")
    batch = update_batch()
    rows = batch.column(column).to_pylist()
    for i in bad_rows:
        rows[i] = [*rows[i], -1.0]
    bad = batch.set_column(batch.schema.get_field_index(column), column, f32_lists(rows))
    with pytest.raises(OperatorError) as info:
        op(bad)
    assert info.value.operator == "actor"
    assert info.value.sample_ids == bad_rows
    assert f"column {column!r} has" in str(info.value)
    assert op._rows == 0  # nothing was accumulated


def test_policy_update_rejects_nan_advantage():
    op = ready(PolicyUpdate(SPEC), "actor")
    batch = update_batch()
    adv = batch.column("advantage").to_pylist()
    adv[6] = math.nan
    bad = batch.set_column(
        batch.schema.get_field_index("advantage"), "advantage", pa.array(adv, pa.float32())
    )
    with pytest.raises(OperatorError, match="'advantage' holds NaN/inf") as info:
        op(bad)
    assert info.value.sample_ids == [6]


def test_policy_update_handles_empty_responses():
    responses = [r if i % 3 else [] for i, r in enumerate(RESP)]
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        op = ready(PolicyUpdate(SPEC, loss_agg_mode=mode, entropy_coef=0.01), "actor")
        op(update_batch(responses))
        metrics = op.end_step(0)
        assert all(math.isfinite(v) for v in metrics.values())


# --- LR schedule ------------------------------------------------------------------------------


def test_lr_factor_warmup_then_cosine():
    # warmup 2, total 6, floor 0.1: steps 0, 1 warm up to 1; cosine over steps 2..6:
    #   step 4: p = 2 / 4 = 0.5 -> 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55
    #   step 3: p = 0.25 -> 0.1 + 0.9 * (1 + cos(pi / 4)) / 2 = 0.868198...
    cfg = OptimConfig(schedule="cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    got = [lr_factor(cfg, s) for s in range(8)]
    c = 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2
    c3 = 0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2
    assert got == pytest.approx([0.5, 1.0, 1.0, c, 0.55, c3, 0.1, 0.1])
    assert [lr_factor(OptimConfig(warmup_steps=4), s) for s in range(6)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    )
    assert lr_factor(OptimConfig(), 0) == 1.0


def test_lr_schedule_is_applied_per_optimizer_step():
    optim = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=2, total_steps=4)
    op = ready(PolicyUpdate(SPEC, optim=optim), "actor")
    lrs = []
    for step in range(5):
        op(update_batch())
        lrs.append(op.end_step(step)["actor/lr"])
    # factors: 0.5, 1, then cosine p = 0, 0.5, 1 -> 1, 0.5, 0
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 0.0])
    assert op.end_step(5) == {}  # no micro-batch: no step, the schedule does not advance


def test_optim_config_validation():
    with pytest.raises(ValueError, match="cosine LR schedule needs total_steps"):
        OptimConfig(schedule="cosine")
    with pytest.raises(ValueError, match="unknown LR schedule 'linear'"):
        OptimConfig(schedule="linear")


# --- critic: Values + CriticUpdate ------------------------------------------------------------


def critic_batch(responses=RESP, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    return pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col(range(len(responses))),
            "prompt_ids": pa.array(PROMPTS[: len(responses)], I32),
            "response_ids": pa.array(responses, I32),
            "values": f32_lists([rng.normal(scale=0.1, size=len(r)) for r in responses]),
            "returns": f32_lists([rng.normal(size=len(r)) for r in responses]),
        }
    )


def test_value_model_reads_the_state_before_each_token():
    critic = VALUE.build(seed=0).eval()
    prompt, response = [1, 4, 13], [5, 6, 2]
    p, pm = list_to_padded(pa.array([prompt], I32), dtype=torch.long)
    r, rm = list_to_padded(pa.array([response], I32), dtype=torch.long)
    with torch.no_grad():
        values = critic(p, pm, r, rm)[0]
        every = critic.token_scores(torch.tensor([prompt + response]))[0]
    # response token k is predicted at column len(prompt) + k - 1 = 2, 3, 4
    torch.testing.assert_close(values, every[[2, 3, 4]])


def test_values_operator_and_critic_update_agree():
    values_op = ready(Values(VALUE), "values")
    batch = critic_batch()
    out = check_output("values", values_op.writes, values_op(batch), list(range(8)))
    assert [len(v) for v in out.column("values").to_pylist()] == [len(r) for r in RESP]
    trainer = ready(CriticUpdate(VALUE, optim=SMALL_LR), "critic")
    # Same spec and seed: the trainer's fresh critic predicts what Values wrote, so V = V_old
    # and clipping is inactive on the first step.
    with torch.no_grad():
        prompt, pm = list_to_padded(batch.column("prompt_ids"), dtype=torch.long)
        resp, rm = list_to_padded(batch.column("response_ids"), dtype=torch.long)
        direct = trainer.model(prompt, pm, resp, rm)
    written, _ = list_to_padded(out.column("values"))
    torch.testing.assert_close(direct, written, atol=1e-6, rtol=0)
    version, weights = trainer.get_weights()
    values_op.set_weights(version, weights)
    assert values_op.version == version


def test_critic_update_accumulation_and_gradient():
    full = critic_batch()
    one = run_step(ready(CriticUpdate(VALUE, optim=SMALL_LR), "critic"), [full])
    two = run_step(
        ready(CriticUpdate(VALUE, optim=SMALL_LR), "critic"), [full.slice(0, 5), full.slice(5, 3)]
    )
    assert_same_step(one, two)
    assert one[2]["critic/vf_clip_frac"] > 0  # V_old far from V: clipping binds somewhere

    model = VALUE.build(seed=0).train()
    prompt, pm = list_to_padded(full.column("prompt_ids"), dtype=torch.long)
    resp, mask = list_to_padded(full.column("response_ids"), dtype=torch.long)
    old, _ = list_to_padded(full.column("values"))
    ret, _ = list_to_padded(full.column("returns"))
    loss, stats = value_clip_loss(model(prompt, pm, resp, mask), old, ret, mask, 0.2)
    loss.backward()
    tokens = float(mask.sum())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(one[0][name] / tokens, p.grad, atol=1e-7, rtol=1e-5)
    assert one[2]["critic/vf_loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert one[2]["critic/vf_clip_frac"] == pytest.approx(stats["critic/vf_clip_frac"].item())


def test_critic_rejects_misaligned_returns_and_wrong_head():
    batch = critic_batch()
    rows = batch.column("returns").to_pylist()
    rows[4] = rows[4][:-1]
    bad = batch.set_column(batch.schema.get_field_index("returns"), "returns", f32_lists(rows))
    with pytest.raises(OperatorError, match="'returns' has 1 items where") as info:
        ready(CriticUpdate(VALUE), "critic")(bad)
    assert info.value.sample_ids == [4]
    with pytest.raises(ValueError, match="needs a value head"):
        CriticUpdate(REWARD)
    with pytest.raises(ValueError, match="needs a value head"):
        Values(REWARD)
    with pytest.raises(ValueError, match="unknown head kind 'q'"):
        HeadSpec(SPEC, kind="q")


# --- ModelReward ------------------------------------------------------------------------------


def rm_batch(responses) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col(range(len(responses))),
            "prompt_ids": pa.array(PROMPTS[: len(responses)], I32),
            "response_ids": pa.array(responses, I32),
        }
    )


def test_model_reward_scores_the_last_real_token(tmp_path):
    op = ready(ModelReward(REWARD), "rm")
    responses = [[3, 4, 2], [], [6, 6, 6, 6, 2]]  # an empty response is scored on its prompt
    out = check_output("rm", op.writes, op(rm_batch(responses)), [0, 1, 2])
    got = out.column("reward").to_pylist()
    model: RewardModel = op.model
    with torch.no_grad():
        for i, r in enumerate(responses):
            seq = torch.tensor([PROMPTS[i] + r])
            alone = model.token_scores(seq)[0, -1].item()  # unpadded row, last token
            assert got[i] == pytest.approx(alone, abs=1e-5)
    # a trained head saved and loaded through HeadSpec(init_path=...) scores the same
    path = tmp_path / "rm.safetensors"
    with torch.no_grad():
        model.score.bias.fill_(0.75)
    save_head(model, path)
    loaded = ready(ModelReward(HeadSpec(SPEC, "reward", str(path)), output="rm_score"), "rm", 9)
    assert loaded.writes == {"rm_score": "float32"}
    shifted = loaded(rm_batch(responses))["rm_score"].to_pylist()
    assert shifted == pytest.approx([g + 0.75 for g in got], abs=1e-5)


def test_model_reward_rejects_empty_prompt_and_value_head():
    op = ready(ModelReward(REWARD), "rm")
    batch = pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col([5, 6]),
            "prompt_ids": pa.array([[1, 3], []], I32),
            "response_ids": pa.array([[4], [5]], I32),
        }
    )
    with pytest.raises(OperatorError, match="'prompt_ids' is empty in 1 rows") as info:
        op(batch)
    assert info.value.sample_ids == [6]
    with pytest.raises(ValueError, match="needs a reward head"):
        ModelReward(VALUE)


def test_value_and_reward_models_share_the_trunk_layout():
    assert isinstance(VALUE.build(), ValueModel) and isinstance(REWARD.build(), RewardModel)
    keys = set(VALUE.build().state_dict())
    assert {"score.weight", "score.bias"} <= keys
    assert any(k.startswith("trunk.") for k in keys)


# --- SFTUpdate --------------------------------------------------------------------------------


def sft_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col(range(8)),
            "prompt_ids": pa.array(PROMPTS, I32),
            "response_ids": pa.array(RESP, I32),
        }
    )


def test_sft_update_is_exact_token_mean_cross_entropy():
    full = sft_batch()
    one = run_step(ready(SFTUpdate(SPEC, optim=SMALL_LR), "sft"), [full])
    two = run_step(ready(SFTUpdate(SPEC, optim=SMALL_LR), "sft"), [full.slice(0, 2), full.slice(2)])
    assert_same_step(one, two)
    model = SPEC.build(seed=0).train()
    prompt, pm = list_to_padded(full.column("prompt_ids"), dtype=torch.long)
    resp, mask = list_to_padded(full.column("response_ids"), dtype=torch.long)
    nll = -response_logprobs(model, prompt, pm, resp, mask)
    loss = (nll * mask).sum() / mask.sum()
    assert one[2]["sft/loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert one[2]["sft/tokens"] == float(mask.sum())


def test_sft_update_lowers_the_loss():
    op = ready(SFTUpdate(SPEC, optim=OptimConfig(lr=3e-3)), "sft")
    losses = []
    for step in range(15):
        op(sft_batch())
        losses.append(op.end_step(step)["sft/loss"])
    assert losses[-1] < 0.6 * losses[0]


# --- model-holding operators share one weights implementation ---------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Generate(SPEC, SamplingParams()),
        lambda: LogProb(SPEC),
        lambda: PolicyUpdate(SPEC),
        lambda: SFTUpdate(SPEC),
        lambda: Values(VALUE),
        lambda: CriticUpdate(VALUE),
        lambda: ModelReward(REWARD),
    ],
)
def test_weights_round_trip_and_are_copies(make):
    a, b = ready(make(), "a", seed=0), ready(make(), "b", seed=1)
    version, weights = a.get_weights()
    assert version == 0
    b.set_weights(7, weights)
    assert b.version == 7
    for k, v in b.get_weights()[1].items():
        assert torch.equal(v, weights[k])
        assert v.data_ptr() != b.model.state_dict()[k].data_ptr()  # a copy, not a view


# --- bad input: rewards, log-probs, generation ------------------------------------------------


def test_reward_functions_see_empty_completions():
    seen = []

    def length(prompts, completions, **kwargs):
        seen.extend(completions)
        return [float(len(c)) for c in completions]

    op = ready(Reward({"length": length}, TOK), "reward")
    batch = pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col([1, 2, 3]),
            "prompt_ids": pa.array([TOK.encode("1+2=", bos=True)] * 3, I32),
            "response_ids": pa.array([[], [TOK.eos_id], TOK.encode("12")], I32),
        }
    )
    out = check_output("reward", op.writes, op(batch), [1, 2, 3])
    assert seen == ["", "", "12"]
    assert out.column("reward").to_pylist() == [0.0, 0.0, 2.0]


def test_reward_function_errors_name_function_and_samples():
    batch = pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col([4, 5]),
            "prompt_ids": pa.array([[1, 3], [1, 4]], I32),
            "response_ids": pa.array([[5], []], I32),
        }
    )

    def crashes_on_empty(prompts, completions, **kwargs):
        return [1.0 / len(c) for c in completions]

    with pytest.raises(OperatorError, match="reward function 'inv' raised ZeroDivisionError"):
        ready(Reward({"inv": crashes_on_empty}, TOK), "reward")(batch)
    with pytest.raises(OperatorError, match="reward function 'none' gave NaN/inf") as info:
        ready(Reward({"none": lambda p, c, **k: [1.0, None]}, TOK), "reward")(batch)
    assert info.value.sample_ids == [5]


def test_logprob_handles_empty_responses_and_rejects_empty_prompts():
    op = ready(LogProb(SPEC, entropy_output="ref_entropy"), "ref")
    batch = pa.RecordBatch.from_pydict(
        {
            "sample_id": ids_col([1, 2]),
            "prompt_ids": pa.array([[1, 3], [1, 4]], I32),
            "response_ids": pa.array([[], [5, 2]], I32),
        }
    )
    out = check_output("ref", op.writes, op(batch), [1, 2])
    assert [len(x) for x in out.column("ref_logprob").to_pylist()] == [0, 2]
    assert [len(x) for x in out.column("ref_entropy").to_pylist()] == [0, 2]
    everything_empty = batch.set_column(2, "response_ids", pa.array([[], []], I32))
    assert op(everything_empty)["ref_logprob"].to_pylist() == [[], []]
    no_prompt = batch.set_column(1, "prompt_ids", pa.array([[1, 3], []], I32))
    with pytest.raises(OperatorError, match="'prompt_ids' is empty") as info:
        op(no_prompt)
    assert info.value.sample_ids == [2]


def test_generate_entropy_column_and_empty_prompt():
    op = ready(Generate(SPEC, SamplingParams(max_new_tokens=4), entropy_column="entropy"), "gen")
    assert op.writes["entropy"] == "list<float32>"
    batch = pa.RecordBatch.from_pydict(
        {"sample_id": ids_col([3, 4]), "prompt_ids": pa.array([[1, 3], [1, 4, 5]], I32)}
    )
    out = check_output("gen", op.writes, op(batch), [3, 4])
    ent = out.column("entropy").to_pylist()
    assert [len(e) for e in ent] == [len(r) for r in out.column("response_ids").to_pylist()]
    assert all(0 <= e <= math.log(CFG.vocab_size) + 1e-5 for row in ent for e in row)
    empty = batch.set_column(1, "prompt_ids", pa.array([[1, 3], []], I32))
    with pytest.raises(OperatorError) as info:
        op(empty)
    assert info.value.operator == "gen" and info.value.sample_ids == [4]
    with pytest.raises(ValueError, match=r"one response per row; got sampling\.n=4"):
        Generate(SPEC, SamplingParams(n=4))


def test_registry_inputs_are_what_group_advantage_can_build():
    buildable = {"rewards", "group_ids", "mask", "token_rewards"}
    for name, est in ADVANTAGE_ESTIMATORS.items():
        if not est.per_token:
            assert set(est.inputs) <= buildable, name
    # GAE needs values from a critic: only GAEAdvantage provides them
    assert "values" in ADVANTAGE_ESTIMATORS["gae"].inputs
    adv, _ = gae_advantages(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=bool))
    assert adv.tolist() == [[0.0, 0.0]]


# --- the operators compose: PPO with a critic, and decoupled PPO, declared and run ------------


def ppo_workflow(decoupled: bool):
    from asyncflow.graph import Workflow
    from asyncflow.workflows.tasks.arithmetic import ArithmeticPrompts, ArithmeticTask, correct_sum

    task = ArithmeticTask()
    tok = task.tokenizer
    sampling = SamplingParams(task.max_answer_tokens, 1.0, tok.eos_id, tok.pad_id, top_k=8)
    policy = ModelSpec(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4))
    critic = HeadSpec(policy, kind="value")
    wf = Workflow("ppo_test")
    wf.add("prompts", ArithmeticPrompts(task, group_size=2))
    wf.add("rollout", Generate(policy, sampling))
    wf.add("values", Values(critic))
    wf.add("reward", Reward({"correct": correct_sum}, tok, extra_columns={"answer": "string"}))
    wf.add("gae", GAEAdvantage(gamma=1.0, lam=0.95))
    extra = {}
    if decoupled:
        wf.add("prox", LogProb(policy, output="prox_logprob"))
        extra = {"policy_loss": "decoupled_ppo", "is_cap": 2.0}
    actor = PolicyUpdate(policy, token_advantages=True, entropy_coef=0.001, **extra)
    wf.add("actor", actor)
    wf.add("critic", CriticUpdate(critic))
    wf.sync_weights("actor", to=["rollout", *(["prox"] if decoupled else [])])
    wf.sync_weights("critic", to=["values"])
    return wf.build()


@pytest.mark.parametrize("decoupled", [False, True])
def test_ppo_graph_validates_and_runs_in_process(decoupled):
    graph = ppo_workflow(decoupled)
    ops = {name: graph.nodes[name].operator for name in graph.order()}
    rows = ops["prompts"].produce(0, 8)
    ids = list(range(rows.num_rows))
    table = {"sample_id": ids_col(ids), **dict(zip(rows.schema.names, rows.columns, strict=True))}
    metrics = {}
    for name, op in ops.items():
        if name == "prompts":
            continue
        ready(op, name)
        batch = pa.RecordBatch.from_pydict({k: table[k] for k in ["sample_id", *op.reads]})
        out = check_output(name, op.writes, op(batch), ids)
        table |= dict(zip(out.schema.names, out.columns, strict=True))
        metrics |= op.end_step(0)
    assert {"actor/pg_loss", "actor/entropy", "critic/vf_loss", "critic/vf_clip_frac"} <= set(
        metrics
    )
    if decoupled:  # prox = rollout weights at version 0: every IS weight is 1
        assert metrics["actor/is_weight"] == pytest.approx(1.0, abs=1e-4)
    lengths = [len(r) for r in table["response_ids"].to_pylist()]
    assert [len(a) for a in table["advantages"].to_pylist()] == lengths
