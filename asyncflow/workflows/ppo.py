"""PPO with a learned critic and GAE on synthetic arithmetic, declared with the DSL.

    prompts -> rollout -> reward ----------------> gae -> actor ~> rollout (weights)
                      \\-> values (critic) -------/   \\-> critic ~> values (weights)

Same task, warm start and evaluation as `grpo`; the differences are the per-token
advantages from GAE over a value model instead of group statistics, and a second
trainer (the critic) with its own weight-sync edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from asyncflow.graph import Workflow
from asyncflow.operators.estimate import GAEAdvantage
from asyncflow.operators.generation import SamplingParams
from asyncflow.operators.heads import HeadSpec
from asyncflow.operators.policy import ModelSpec
from asyncflow.operators.rollout import Generate
from asyncflow.operators.scoring import Reward, Values
from asyncflow.operators.update import CriticUpdate, OptimConfig, PolicyUpdate
from asyncflow.workflows import grpo
from asyncflow.workflows.recipe import Recipe
from asyncflow.workflows.tasks.arithmetic import ArithmeticPrompts, correct_sum


@dataclass(frozen=True)
class PPOConfig(grpo.GRPOConfig):
    group_size: int = 4  # PPO needs no groups; a few samples per prompt still help
    prompts_per_step: int = 64
    gamma: float = 1.0  # discount over response tokens
    lam: float = 0.95  # GAE lambda
    critic_lr: float = 1e-3
    value_clip: float = 0.2


def build(cfg: PPOConfig, init_path: str | None = None) -> Workflow:
    policy = ModelSpec(cfg.model, init_path)
    critic = HeadSpec(ModelSpec(cfg.model), kind="value")
    tok = cfg.task.tokenizer
    sampling = SamplingParams(cfg.task.max_answer_tokens, cfg.temperature, tok.eos_id, tok.pad_id)

    wf = Workflow("ppo", description="PPO (critic + GAE) on a-plus-b arithmetic")
    wf.add("prompts", ArithmeticPrompts(cfg.task, cfg.group_size, cfg.seed))
    wf.add("rollout", Generate(policy, sampling), replicas=cfg.rollout_replicas)
    wf.add("reward", Reward({"correct": correct_sum}, tok, extra_columns={"answer": "string"}))
    wf.add("values", Values(critic))
    wf.add("gae", GAEAdvantage(gamma=cfg.gamma, lam=cfg.lam))
    wf.add(
        "actor",
        PolicyUpdate(
            policy,
            optim=OptimConfig(lr=cfg.lr),
            clip_eps=cfg.clip_eps,
            token_advantages=True,
        ),
        replicas=cfg.actor_replicas,
    )
    wf.add(
        "critic",
        CriticUpdate(critic, optim=OptimConfig(lr=cfg.critic_lr), value_clip=cfg.value_clip),
    )
    wf.sync_weights("actor", to=["rollout"])
    wf.sync_weights("critic", to=["values"])
    return wf


def recipe(cfg: PPOConfig, run_dir: Path) -> Recipe:
    return grpo.recipe(cfg, run_dir, build_fn=partial(build))
