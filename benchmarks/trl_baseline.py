"""The TRL side of `vs_trl.py`: TRL's `GRPOTrainer` on the arithmetic task, on CPU.

Run by `vs_trl.py` in a process of its own, so its peak memory is measured apart from
asyncflow's and trl is imported only here. It loads the model and tokenizer that
`vs_trl.py` saved (a local directory: nothing is downloaded), trains on exactly the
prompts asyncflow's `grpo` source produces step by step, and writes one JSON file
with per-step figures, the training time and the held-out accuracy after training
(measured with asyncflow's own `grpo.evaluate`, so both systems are scored alike).

    python benchmarks/trl_baseline.py --model-dir DIR --steps N --out result.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from asyncflow.workflows import grpo
from asyncflow.workflows.tasks.arithmetic import ArithmeticPrompts, correct_sum

MISSING_TRL = (
    "the TRL baseline needs trl (and its datasets/accelerate): pip install -e .[bench-trl]"
)


def require_trl() -> None:
    """Fail with the install command instead of a bare ImportError deep inside a run."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"{MISSING_TRL} ({exc})") from None


def task_prompts(steps: int, prompts_per_step: int, group_size: int, seed: int) -> dict:
    """The prompts asyncflow's source emits, in step order, one row per group.

    Built by calling the same `ArithmeticPrompts.produce` the grpo workflow runs, so
    TRL's step k (unshuffled dataset) trains on asyncflow's step k problems.
    """
    source = ArithmeticPrompts(grpo.GRPOConfig().task, group_size, seed)
    tok = source.task.tokenizer
    texts: list[str] = []
    answers: list[str] = []
    prompt_ids: list[list[int]] = []
    for step in range(steps):
        rows = source.produce(step, prompts_per_step * group_size).to_pydict()
        for ids, answer in zip(
            rows["prompt_ids"][::group_size], rows["answer"][::group_size], strict=True
        ):
            texts.append("<bos>" + tok.decode(ids))  # the tokenizer maps <bos> to bos_id
            answers.append(answer)
            prompt_ids.append(ids)
    return {"prompt": texts, "answer": answers, "prompt_ids": prompt_ids}


def trl_config(args: argparse.Namespace, output_dir: str) -> Any:
    """TRL settings matched to asyncflow's grpo recipe (see benchmarks/README.md).

    One generation batch per optimizer step (prompts_per_step x group_size completions),
    one update per batch (num_iterations=1), token-mean loss over the step ("dapo"),
    group-std advantages, clip 0.2, no KL, AdamW at a constant lr with grad-norm 1.0,
    float32 and no gradient checkpointing (asyncflow uses neither bf16 nor checkpointing).
    """
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts_per_step * args.group_size,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        epsilon=args.clip_eps,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=args.steps,
        shuffle_dataset=False,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )


def step_clock() -> Any:
    """A TrainerCallback that timestamps every step and keeps TRL's per-step logs."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.step_ends: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.logs.append({"step": state.global_step, **logs})

    return StepClock()


def step_records(clock: Any, samples_per_step: int) -> list[dict[str, float]]:
    """One record per optimizer step, in the shape of asyncflow's metrics.jsonl."""
    records, last = [], clock.start
    for step, (end, logs) in enumerate(zip(clock.step_ends, clock.logs, strict=True)):
        reward = float(logs["reward"])
        records.append(
            {
                "step": step,
                "samples": samples_per_step,
                "step_time": end - last,
                "reward": reward,
                "accuracy": reward,  # the only reward is 0/1 correctness
                "response_len": float(logs["completions/mean_length"]),
            }
        )
        last = end
    return records


def load_policy(model_dir: str) -> tuple[Any, Any]:
    """The saved Qwen2 and tokenizer, float32 and sdpa as asyncflow's `HFModelSpec` loads it."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer


def check_prompt_ids(tokenizer: Any, data: dict) -> None:
    """TRL tokenizes the prompt text itself: it must give asyncflow's prompt ids exactly."""
    got = tokenizer(text=data["prompt"][:64])["input_ids"]
    if got != data["prompt_ids"][:64]:
        raise SystemExit("the saved tokenizer does not reproduce asyncflow's prompt ids")


def heldout_accuracy(model: Any, model_dir: str) -> float:
    """Greedy held-out accuracy through asyncflow's `grpo.evaluate` (same code, same data)."""
    from asyncflow.operators.hf import HFCausalLM

    weights = HFCausalLM(model).state_dict()
    cfg = grpo.GRPOConfig(hf_model=model_dir)
    return float(grpo.evaluate(cfg, weights)["accuracy"])


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Set up (not timed), train (timed by the callback), evaluate (not timed)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = task_prompts(args.steps, args.prompts_per_step, args.group_size, args.seed)
    model, tokenizer = load_policy(args.model_dir)
    check_prompt_ids(tokenizer, data)
    dataset = Dataset.from_dict({"prompt": data["prompt"], "answer": data["answer"]})
    clock = step_clock()
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as output_dir:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[correct_sum],
            args=trl_config(args, output_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        setup_s = time.perf_counter() - t0
        trainer.train()
    records = step_records(clock, args.prompts_per_step * args.group_size)
    model.eval()
    return {
        "setup_s": setup_s,
        "train_s": clock.step_ends[-1] - clock.start,
        "steps": records,
        "after_accuracy": heldout_accuracy(model, args.model_dir),
        "torch_threads": torch.get_num_threads(),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import datasets
    import transformers
    import trl

    return {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "torch": torch.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="save_pretrained directory")
    parser.add_argument("--out", required=True, type=Path, help="result JSON")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--clip-eps", type=float, default=0.2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_trl()
    result = train(args)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
