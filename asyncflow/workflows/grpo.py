"""GRPO on synthetic arithmetic, declared with the DSL.

    prompts -> rollout -> reward -> advantage -> actor ~> rollout (weights)
                      \\-> ref (frozen SFT policy, when kl_coef > 0) -> actor

The policy starts from a short SFT warm start on the same task (our own code,
seeded), so it is partly competent and RL has room to improve it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from asyncflow.errors import ConfigError
from asyncflow.graph import Workflow
from asyncflow.operators.estimate import GroupAdvantage
from asyncflow.operators.generation import SamplingParams, generate
from asyncflow.operators.hf import HFModelSpec
from asyncflow.operators.model import CausalLM, ModelConfig
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.rollout import Generate
from asyncflow.operators.scoring import LogProb, Reward
from asyncflow.operators.sft import sft_train
from asyncflow.operators.update import OptimConfig, PolicyUpdate
from asyncflow.workflows.recipe import Recipe
from asyncflow.workflows.tasks.arithmetic import ArithmeticPrompts, ArithmeticTask, correct_sum


@dataclass(frozen=True)
class GRPOConfig:
    steps: int = 150  # RL steps (one optimizer step each)
    prompts_per_step: int = 32
    group_size: int = 8  # responses sampled per prompt
    micro_batch_size: int = 64  # rows per micro-batch handed to a replica
    rollout_replicas: int = 2
    # > 1: data-parallel actor ranks (one gloo group, gradients all-reduced each step)
    actor_replicas: int = 1
    temperature: float = 1.0
    lr: float = 3e-4
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0 adds a frozen reference and a k3 KL penalty
    advantage: str = "grpo"  # per-sample estimator: grpo | drgrpo | rloo | reinforce_pp
    seed: int = 0
    task: ArithmeticTask = field(default_factory=ArithmeticTask)
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(vocab_size=15, max_seq_len=16, d_model=64, n_layers=2)
    )
    warmstart_steps: int = 300  # SFT steps before RL: enough to be partly competent
    init: str | None = None  # safetensors policy to start from instead of the warm start
    # a local transformers model directory (save_pretrained) as the policy instead of the
    # native model; its weights are the start (no warm start). Same ids as the task tokenizer.
    hf_model: str | None = None


def build(cfg: GRPOConfig, init_path: str | None = None) -> Workflow:
    """The GRPO graph. Without `init_path` the policy starts from the recipe's warm start."""
    if cfg.model.vocab_size != cfg.task.tokenizer.vocab_size:
        raise ConfigError(
            f"model vocab_size {cfg.model.vocab_size} != task tokenizer's "
            f"{cfg.task.tokenizer.vocab_size}"
        )
    if cfg.hf_model is not None:
        policy = HFModelSpec(path=cfg.hf_model)
    else:
        policy = ModelSpec(cfg.model, init_path)
    tok = cfg.task.tokenizer
    sampling = SamplingParams(cfg.task.max_answer_tokens, cfg.temperature, tok.eos_id, tok.pad_id)

    name = "grpo" if cfg.advantage == "grpo" else cfg.advantage
    wf = Workflow(name, description=f"{cfg.advantage} advantages on a-plus-b arithmetic")
    wf.add("prompts", ArithmeticPrompts(cfg.task, cfg.group_size, cfg.seed))
    wf.add("rollout", Generate(policy, sampling), replicas=cfg.rollout_replicas)
    if cfg.kl_coef > 0:
        wf.add("ref", LogProb(policy, output="ref_logprob"))
    wf.add("reward", Reward({"correct": correct_sum}, tok, extra_columns={"answer": "string"}))
    wf.add("advantage", GroupAdvantage(estimator=cfg.advantage))
    wf.add(
        "actor",
        PolicyUpdate(
            policy,
            optim=OptimConfig(lr=cfg.lr),
            clip_eps=cfg.clip_eps,
            kl_coef=cfg.kl_coef,
        ),
        replicas=cfg.actor_replicas,
    )
    wf.sync_weights("actor", to=["rollout"])
    return wf


def recipe(cfg: GRPOConfig, run_dir: Path, build_fn=None) -> Recipe:
    """Everything a run needs; `build_fn` swaps the graph (e.g. PPO's) around the same task."""
    if cfg.hf_model is not None and build_fn is not None:
        raise ConfigError("hf_model: only the grpo graph builds a transformers policy")
    return Recipe(
        workflow=(build_fn or build)(cfg, cfg.init),
        steps=cfg.steps,
        rows_per_step=cfg.prompts_per_step * cfg.group_size,
        micro_batch_size=cfg.micro_batch_size,
        seed=cfg.seed,
        metric_columns=("reward", "correct", "response_ids", "policy_version"),
        step_metrics=step_metrics,
        trainer="actor",
        model_config=None if cfg.hf_model else cfg.model,
        prepare=None if cfg.init or cfg.hf_model else partial(warm_start, cfg),
        prepare_targets=("rollout", "actor", "ref") if cfg.kl_coef > 0 else ("rollout", "actor"),
        evaluate=partial(evaluate, cfg),
    )


def step_metrics(rows: pa.Table) -> dict[str, float]:
    lengths = np.diff(rows.column("response_ids").combine_chunks().offsets.to_numpy())
    return {
        "reward": float(np.mean(rows.column("reward").to_numpy())),
        "accuracy": float(np.mean(rows.column("correct").to_numpy())),
        "response_len": float(lengths.mean()),
        "policy_version": float(np.min(rows.column("policy_version").to_numpy())),
    }


def warm_start(cfg: GRPOConfig) -> tuple[dict, dict[str, float]]:
    """SFT on the task's training problems: a partly competent, seeded starting policy."""
    torch.manual_seed(cfg.seed)
    model = CausalLM(cfg.model)
    rng = np.random.default_rng(cfg.seed + 1)
    task, tok = cfg.task, cfg.task.tokenizer

    def examples(step: int):
        problems = task.sample(128, rng)
        return task.encode_prompts(problems), [
            tok.encode(task.answer(a, b), eos=True) for a, b in problems
        ]

    loss = sft_train(model, examples, steps=cfg.warmstart_steps)
    return dict(model.state_dict()), {"warmstart/loss": loss}


def evaluate(cfg: GRPOConfig, weights: dict) -> dict[str, float]:
    """Greedy accuracy on the held-out problems (never sampled for training)."""
    model = HFModelSpec(path=cfg.hf_model).build() if cfg.hf_model else CausalLM(cfg.model)
    model.load_state_dict(weights)
    task, tok = cfg.task, cfg.task.tokenizer
    problems = task.heldout()
    params = SamplingParams(task.max_answer_tokens, 0.0, tok.eos_id, tok.pad_id)
    out = generate(model, task.encode_prompts(problems), params)
    answers = [task.answer(a, b) for a, b in problems]
    hits = [tok.decode(r) == ans for r, ans in zip(out.responses, answers, strict=True)]
    return {"accuracy": float(np.mean(hits))}
