"""asyncflow vs TRL's `GRPOTrainer`, side by side on CPU, in one invocation.

Both systems post-train the same tiny Qwen2 (built from a config, warm-started here with
asyncflow's SFT code, saved with `save_pretrained` to a local directory that both load:
nothing is downloaded) with GRPO on the same `a+b=` prompts, group size, response
length, clip, AdamW learning rate and reward function. TRL runs in a process of its own
(`trl_baseline.py`); asyncflow runs through its command line (`asyncflow run grpo`) in
sync mode, and in async mode when the CLI offers `--mode`. Each system runs in turn, so
none competes with another for the two cores.

Reported per system: samples/s and generated tokens/s over the training steps only
(cluster start, model loading, warm start and evaluation are excluded and timed apart),
peak RSS summed over the process tree (asyncflow: the CLI and its Dask worker processes),
the reward against samples seen, and greedy held-out accuracy after training (the same
`grpo.evaluate` for all). `--json OUT` writes every figure.

    pip install -e .[bench-trl]
    python benchmarks/vs_trl.py --quick              # 20 steps each: about 1-2 minutes
    python benchmarks/vs_trl.py --json vs_trl.json   # 150 steps each: about 4 minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # machine_info, also when imported by tests

from machine_info import describe  # noqa: E402

MISSING_TRL = "this benchmark needs trl, which the core does not: pip install -e .[bench-trl]"


@dataclass(frozen=True)
class Setting:
    """What both systems share: model shape, task batch, optimisation, seeds."""

    steps: int = 150
    prompts_per_step: int = 32
    group_size: int = 8
    lr: float = 3e-4
    clip_eps: float = 0.2
    temperature: float = 1.0
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    warmstart_steps: int = 700  # SFT steps: the Qwen2 reaches ~30% held-out accuracy


@dataclass
class SystemRun:
    """One system's raw measurements: its step records and its process's footprint."""

    name: str
    records: list[dict[str, float]]
    train_s: float  # the training steps only
    wall_s: float  # the whole process: start-up, set-up, training, evaluation
    peak_rss_mib: float  # summed over the process tree, sampled every 0.1 s
    processes: int  # most processes alive at once in that tree
    after_accuracy: float | None
    extra: dict[str, Any]


# -- the shared initial model ---------------------------------------------------------------


def require_trl() -> None:
    """The comparison is meaningless without the other side: say how to install it."""
    missing = [m for m in ("trl", "datasets", "transformers") if not importlib.util.find_spec(m)]
    if missing:
        raise SystemExit(f"vs_trl: {MISSING_TRL} (missing: {', '.join(missing)})")


def char_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` with exactly the ids of the task's `CharTokenizer`.

    One token per character of "0123456789+=", ids 0-2 for <pad>, <bos>, <eos>, built
    in code. TRL needs a transformers tokenizer; asyncflow keeps its own. Same ids, so
    both feed the model identical tokens (checked in `check_tokenizer`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from asyncflow.workflows.tasks.arithmetic import ALPHABET

    specials = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab = {**specials, **{ch: len(specials) + i for i, ch in enumerate(ALPHABET)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()  # characters back to one string, no spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def check_tokenizer(hf_tokenizer: Any) -> None:
    """Refuse to compare if the two tokenizers disagree on any id."""
    from asyncflow.workflows.grpo import GRPOConfig

    tok = GRPOConfig().task.tokenizer
    for text in ("0+0=", "12+34=", "99+99=", "7+80="):
        ours = tok.encode(text, bos=True)
        theirs = hf_tokenizer("<bos>" + text)["input_ids"]
        if ours != theirs or hf_tokenizer.decode(ours, skip_special_tokens=True) != text:
            raise SystemExit(f"tokenizer mismatch on {text!r}: {ours} vs {theirs}")
    if len(hf_tokenizer) != tok.vocab_size:
        raise SystemExit(f"vocab sizes differ: {len(hf_tokenizer)} vs {tok.vocab_size}")


def qwen2_config(setting: Setting, vocab_size: int) -> Any:
    """A tiny Qwen2: `layers` x `hidden`, 4 heads (2 KV heads), MLP 4x, untied head."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=setting.hidden,
        intermediate_size=4 * setting.hidden,
        num_hidden_layers=setting.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,  # prompt <= 7 tokens + answer <= 4
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def prepare_initial_model(setting: Setting, out_dir: Path) -> dict[str, float]:
    """Seeded Qwen2, SFT warm start with asyncflow's `sft_train`, `save_pretrained`.

    The warm start makes the policy partly competent (RL needs some reward to start
    from), as `asyncflow run grpo` does for its native model. Both systems load this
    directory, so their reward curves start from the same weights.
    """
    from transformers import Qwen2ForCausalLM

    from asyncflow.operators.hf import HFCausalLM
    from asyncflow.operators.sft import sft_train
    from asyncflow.workflows import grpo

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # untimed; one thread is slower alone but far steadier under load
    hf_tokenizer = char_tokenizer()
    check_tokenizer(hf_tokenizer)
    task = grpo.GRPOConfig().task
    torch.manual_seed(setting.seed)
    model = HFCausalLM(Qwen2ForCausalLM(qwen2_config(setting, len(hf_tokenizer))))
    rng = np.random.default_rng(setting.seed + 1)

    def examples(step: int) -> tuple[list[list[int]], list[list[int]]]:
        problems = task.sample(128, rng)
        answers = [task.tokenizer.encode(task.answer(a, b), eos=True) for a, b in problems]
        return task.encode_prompts(problems), answers

    loss = (
        sft_train(model, examples, steps=setting.warmstart_steps)
        if setting.warmstart_steps
        else math.nan
    )
    model.hf.save_pretrained(out_dir)
    hf_tokenizer.save_pretrained(out_dir)
    accuracy = grpo.evaluate(grpo.GRPOConfig(hf_model=str(out_dir)), model.state_dict())
    return {
        "seconds": time.perf_counter() - t0,
        "sft_loss": loss,
        "accuracy_before": accuracy["accuracy"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# -- running a system in a child process, watching its memory -------------------------------


class ProcessWatch:
    """Peak RSS summed over a process and all its descendants, and their CPU seconds,
    sampled in a thread.

    Summing RSS counts shared pages once per process, so it over-states a little; CPU
    time misses at most one interval per process. The same rules apply to both systems.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_bytes = 0
        self.processes = 0
        self._cpu: dict[int, float] = {}  # pid -> user + system seconds when last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in tree:
            try:
                total += proc.memory_info().rss
                times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
            except psutil.Error:
                continue  # it just exited
        self.peak_bytes = max(self.peak_bytes, total)
        self.processes = max(self.processes, len(tree))


def run_child(cmd: list[str], log: Path) -> tuple[float, ProcessWatch, dict[str, float]]:
    """Run `cmd` with its output in `log`: its wall time, memory and CPU, and the machine's
    load average around it (a busy machine slows a 2-thread process the most)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    load = {"load_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        with ProcessWatch(proc.pid) as watch:
            code = proc.wait()
    wall = time.perf_counter() - t0
    load["load_after"] = os.getloadavg()[0]
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-30:])
        raise SystemExit(f"vs_trl: {' '.join(cmd[:4])} ... failed ({code}); log {log}:\n{tail}")
    return wall, watch, load


def run_trl(setting: Setting, model_dir: Path, work: Path, threads: int) -> SystemRun:
    """TRL's GRPOTrainer in its own process (`trl_baseline.py`)."""
    out = work / f"trl-{threads}t.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "trl_baseline.py"),
        f"--model-dir={model_dir}",
        f"--out={out}",
        f"--steps={setting.steps}",
        f"--prompts-per-step={setting.prompts_per_step}",
        f"--group-size={setting.group_size}",
        f"--max-completion-length={max_answer_tokens()}",
        f"--lr={setting.lr}",
        f"--clip-eps={setting.clip_eps}",
        f"--temperature={setting.temperature}",
        f"--seed={setting.seed}",
        f"--threads={threads}",
    ]
    wall, watch, load = run_child(cmd, work / f"trl-{threads}t.log")
    result = json.loads(out.read_text())
    extra = {k: result[k] for k in ("setup_s", "torch_threads", "ru_maxrss_mib", "versions")}
    extra.update(load, cpu_s=watch.cpu_s)
    return SystemRun(
        f"TRL {threads} thread{'s' if threads > 1 else ''}",
        result["steps"],
        result["train_s"],
        wall,
        watch.peak_bytes / 2**20,
        watch.processes,
        result["after_accuracy"],
        extra,
    )


def max_answer_tokens() -> int:
    from asyncflow.workflows.grpo import GRPOConfig

    return GRPOConfig().task.max_answer_tokens


def asyncflow_cli_options() -> str:
    """`asyncflow run --help`: which options this asyncflow's CLI has."""
    return subprocess.run(
        [sys.executable, "-m", "asyncflow.cli", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout


def asyncflow_modes(help_text: str) -> list[str]:
    """sync always; async only if the CLI lists `--mode`."""
    return ["sync", "async"] if "--mode" in help_text else ["sync"]


# debugging aids that TRL has no counterpart of: off for the comparison, when the CLI has them
OBSERVABILITY_OFF = ("--no-record", "--no-dashboard-page")


def observability_off(help_text: str) -> list[str]:
    return [flag for flag in OBSERVABILITY_OFF if flag in help_text]


def run_asyncflow(
    setting: Setting,
    model_dir: Path,
    work: Path,
    mode: str,
    workers: int,
    extra_args: list[str],
) -> SystemRun:
    """`asyncflow run grpo` on the saved Qwen2 (`--set hf_model=DIR`), then its metrics."""
    run_dir = work / f"asyncflow-{mode}"
    overrides = {
        "hf_model": model_dir,
        "prompts_per_step": setting.prompts_per_step,
        "group_size": setting.group_size,
        "lr": setting.lr,
        "clip_eps": setting.clip_eps,
        "temperature": setting.temperature,
        "kl_coef": 0.0,
    }
    cmd = [
        sys.executable,
        "-m",
        "asyncflow.cli",
        "run",
        "grpo",
        f"--run-dir={run_dir}",
        f"--steps={setting.steps}",
        f"--seed={setting.seed}",
        f"--workers={workers}",
    ]
    if mode != "sync":
        cmd.append(f"--mode={mode}")
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    cmd += extra_args
    wall, watch, load = run_child(cmd, work / f"asyncflow-{mode}.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    return SystemRun(
        f"asyncflow {mode}",
        records,
        sum(r["step_time"] for r in records),
        wall,
        watch.peak_bytes / 2**20,
        watch.processes,
        evaluation["after"]["accuracy"],
        {
            "accuracy_before": evaluation["before"]["accuracy"],
            "workers": workers,
            "extra_args": extra_args,
            "cpu_s": watch.cpu_s,
            **load,
        },
    )


# -- figures --------------------------------------------------------------------------------

RATIO_METRICS = (
    "samples_per_s",
    "samples_per_s_after_step1",
    "samples_per_s_median_step",
    "tokens_per_s",
    "peak_rss_mib",
)


def summarise(run: SystemRun, windows: int) -> dict[str, Any]:
    """Throughput over the training steps, footprint, and the reward curve."""
    samples = sum(r["samples"] for r in run.records)
    tokens = sum(r["samples"] * r["response_len"] for r in run.records)
    later = run.records[1:] or run.records
    rewards = [r["reward"] for r in run.records]
    half = rewards[len(rewards) // 2 :]
    return {
        "steps": len(run.records),
        "samples": samples,
        "train_s": run.train_s,
        "wall_s": run.wall_s,
        "samples_per_s": samples / run.train_s,
        "samples_per_s_after_step1": sum(r["samples"] for r in later)
        / sum(r["step_time"] for r in later),
        "samples_per_s_median_step": float(
            np.median([r["samples"] / r["step_time"] for r in run.records])
        ),
        "tokens_per_s": tokens / run.train_s,
        "cpu_s": run.extra["cpu_s"],
        "load_before": run.extra["load_before"],
        "load_after": run.extra["load_after"],
        "peak_rss_mib": run.peak_rss_mib,
        "processes": run.processes,
        "reward_mean": float(np.mean(rewards)),
        "reward_second_half": float(np.mean(half)),
        "reward_first_step": rewards[0],
        "accuracy_after": run.after_accuracy,
        "curve": reward_curve(run.records, windows),
        "extra": run.extra,
        "per_step": run.records,
    }


def reward_curve(records: list[dict[str, float]], windows: int) -> list[dict[str, float]]:
    """Mean reward per window of consecutive steps, against samples seen at the window end."""
    chunks = np.array_split(np.arange(len(records)), min(windows, len(records)))
    curve, seen = [], 0
    for chunk in chunks:
        seen += sum(records[i]["samples"] for i in chunk)
        curve.append(
            {"samples_seen": seen, "reward": float(np.mean([records[i]["reward"] for i in chunk]))}
        )
    return curve


def baseline(summaries: dict[str, dict[str, Any]]) -> str:
    """The fastest TRL run: asyncflow is compared with TRL at its best thread count."""
    trl = [key for key in summaries if key.startswith("trl")]
    return max(trl, key=lambda key: summaries[key]["samples_per_s"])


def ratios(summaries: dict[str, dict[str, Any]], base_key: str) -> dict[str, dict[str, float]]:
    """asyncflow / TRL for every asyncflow mode and each headline figure."""
    base = summaries[base_key]
    out = {}
    for key, s in summaries.items():
        if key.startswith("trl"):
            continue
        out[key] = {metric: s[metric] / base[metric] for metric in RATIO_METRICS}
    return out


def targets(summaries: dict[str, dict[str, Any]], base_key: str) -> dict[str, dict[str, Any]]:
    """>= 2x TRL's samples/s with the same or better reward.

    "Same or better": mean reward over the second half of the run at least TRL's minus
    two standard errors of the difference, treating the 0/1 rewards as independent
    draws. That covers sampling noise only: seed to seed variation is not measured by
    one run, so read a small difference as a tie.
    """
    base = summaries[base_key]
    p = base["reward_second_half"]
    out = {}
    for key, s in summaries.items():
        if key.startswith("trl"):
            continue
        q = s["reward_second_half"]
        variance = p * (1 - p) / _second_half_samples(base) + q * (1 - q) / _second_half_samples(s)
        tolerance = 2 * math.sqrt(variance)
        speed = s["samples_per_s"] / base["samples_per_s"]
        reward_ok = q >= p - tolerance
        out[key] = {
            "speedup": speed,
            "speed_pass": speed >= 2.0,
            "reward_delta": s["reward_second_half"] - p,
            "reward_tolerance": tolerance,
            "reward_pass": reward_ok,
            "pass": speed >= 2.0 and reward_ok,
        }
    return out


def _second_half_samples(summary: dict[str, Any]) -> int:
    steps = summary["per_step"]
    return max(sum(r["samples"] for r in steps[len(steps) // 2 :]), 1)


# -- printing -------------------------------------------------------------------------------


# (label, how to show one system's summary) for the main table
ROWS: list[tuple[str, Any]] = [
    ("steps x samples/step", lambda s: f"{s['steps']} x {s['samples'] // s['steps']}"),
    ("training time (s)", lambda s: f"{s['train_s']:.1f}"),
    ("whole process (s)", lambda s: f"{s['wall_s']:.1f}"),
    ("samples/s", lambda s: f"{s['samples_per_s']:.1f}"),
    ("samples/s after step 1", lambda s: f"{s['samples_per_s_after_step1']:.1f}"),
    ("samples/s at the median step", lambda s: f"{s['samples_per_s_median_step']:.1f}"),
    ("generated tokens/s", lambda s: f"{s['tokens_per_s']:.1f}"),
    ("peak RSS, MiB (processes)", lambda s: f"{s['peak_rss_mib']:.0f} ({s['processes']})"),
    ("CPU seconds, whole process", lambda s: f"{s['cpu_s']:.1f}"),
    ("load average before/after", lambda s: f"{s['load_before']:.2f}/{s['load_after']:.2f}"),
    ("reward, first step", lambda s: f"{s['reward_first_step']:.3f}"),
    ("reward, mean over the run", lambda s: f"{s['reward_mean']:.3f}"),
    ("reward, second half", lambda s: f"{s['reward_second_half']:.3f}"),
    ("held-out accuracy after", lambda s: _pct(s["accuracy_after"])),
]


def print_report(
    summaries: dict[str, dict[str, Any]],
    names: dict[str, str],
    init: dict[str, float],
    skipped: list[str],
) -> None:
    """The main table, the reward curve, the ratios and the target verdicts."""
    keys = list(summaries)
    header = ["", *(names[k] for k in keys)]
    print(f"\ninitial model: held-out accuracy {_pct(init['accuracy_before'])} (both systems)")
    _table(header, [[label, *(show(summaries[k]) for k in keys)] for label, show in ROWS])

    print("\nreward against samples seen (mean reward per window of steps)")
    curves = [summaries[k]["curve"] for k in keys]
    curve_rows = [
        [f"{points[0]['samples_seen']:,}", *(f"{p['reward']:.3f}" for p in points)]
        for points in zip(*curves, strict=True)
    ]
    _table(["samples seen", *header[1:]], curve_rows)

    base_key = baseline(summaries)
    print(f"\nratios asyncflow / {names[base_key]} (the faster TRL run)")
    ratio_rows = [
        [names[k], *(f"{v[m]:.2f}x" for m in RATIO_METRICS)]
        for k, v in ratios(summaries, base_key).items()
    ]
    _table(["", *RATIO_METRICS], ratio_rows)

    print("\ntarget: >= 2x TRL samples/s with the same or better reward (second half, 2 SE)")
    for key, t in targets(summaries, base_key).items():
        speed = "ok" if t["speed_pass"] else "below 2x"
        reward = "ok" if t["reward_pass"] else "worse"
        print(
            f"  {names[key]}: {t['speedup']:.2f}x samples/s ({speed}); reward "
            f"{t['reward_delta']:+.3f} vs TRL (tolerance {t['reward_tolerance']:.3f}, {reward})"
            f" -> {'PASS' if t['pass'] else 'MISS'}"
        )
    for line in skipped:
        print(f"  {line}")
    print(
        "\nsamples/s and tokens/s cover the training steps only: cluster start, model loading, "
        "the SFT warm start and evaluation are excluded (see 'whole process')."
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = " | ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in rows:
        print(
            " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="asyncflow vs TRL GRPOTrainer on CPU, same model, task and settings."
    )
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure to OUT")
    parser.add_argument("--steps", type=int, help="RL steps per system (default 150; quick 20)")
    parser.add_argument("--prompts-per-step", type=int, default=Setting.prompts_per_step)
    parser.add_argument("--group-size", type=int, default=Setting.group_size)
    parser.add_argument("--lr", type=float, default=Setting.lr)
    parser.add_argument("--seed", type=int, default=Setting.seed)
    parser.add_argument("--warmstart-steps", type=int, default=Setting.warmstart_steps)
    parser.add_argument(
        "--trl-threads",
        type=_int_list,
        default=sorted({1, os.cpu_count() or 1}),
        metavar="N[,N...]",
        help="torch threads for TRL, one run each; asyncflow is compared with the fastest "
        "(default: 1 and the core count)",
    )
    parser.add_argument("--workers", type=int, default=2, help="asyncflow worker processes")
    parser.add_argument(
        "--asyncflow-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `asyncflow run`, e.g. --asyncflow-arg=--torch-threads=2 "
        "(repeatable; engine settings only, the shared settings are fixed above)",
    )
    parser.add_argument(
        "--keep-observability",
        action="store_true",
        help="leave asyncflow's run recording and dashboard page on (by default they are "
        "switched off with --no-record/--no-dashboard-page when the CLI has them: TRL "
        "runs without either)",
    )
    parser.add_argument("--hidden", type=int, default=Setting.hidden, help="Qwen2 hidden size")
    parser.add_argument("--layers", type=int, default=Setting.layers, help="Qwen2 layers")
    parser.add_argument("--windows", type=int, default=10, help="points on the reward curve")
    parser.add_argument(
        "--work-dir", type=Path, help="keep the model, logs and run dirs here (default: temp)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_trl()
    steps = args.steps or (20 if args.quick else Setting.steps)
    setting = Setting(
        steps=steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        lr=args.lr,
        seed=args.seed,
        warmstart_steps=args.warmstart_steps,
        hidden=args.hidden,
        layers=args.layers,
    )
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers loads
    meta = describe("torch")  # where and when: busy 2-core numbers mean little without
    print(f"asyncflow vs TRL ({'quick' if args.quick else 'full'}) -- {meta['date']}")
    print(
        f"machine: {meta['cores']} cores, {meta['memory_gib']} GiB, "
        f"load {meta['load_average_1m_at_start']:.2f}; torch {meta['torch']}, "
        f"asyncflow {meta['asyncflow_commit']}"
    )
    print(f"setting: {asdict(setting)}")
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = work / "qwen2-init"
        init = prepare_initial_model(setting, model_dir)
        print(
            f"initial model: {init['parameters']:,} parameters, {setting.warmstart_steps} SFT "
            f"steps in {init['seconds']:.1f}s (not timed), "
            f"held-out accuracy {_pct(init['accuracy_before'])}"
        )
        runs = {
            f"trl_{n}t": _announce(run_trl(setting, model_dir, work, n)) for n in args.trl_threads
        }
        help_text = asyncflow_cli_options()
        modes = asyncflow_modes(help_text)
        extra = [] if args.keep_observability else observability_off(help_text)
        extra += args.asyncflow_arg
        if extra:
            print(f"asyncflow run extra arguments: {' '.join(extra)}")
        for mode in modes:
            run = run_asyncflow(setting, model_dir, work, mode, args.workers, extra)
            runs[f"asyncflow_{mode}"] = _announce(run)
    skipped = (
        [] if "async" in modes else ["asyncflow async: not available yet (no --mode in the CLI)"]
    )
    summaries = {key: summarise(run, args.windows) for key, run in runs.items()}
    names = {key: run.name for key, run in runs.items()}
    print_report(summaries, names, init, skipped)
    if args.json:
        meta["load_average_1m_at_end"] = os.getloadavg()[0]
        report = {
            "meta": meta,
            "setting": asdict(setting),
            "trl_threads": args.trl_threads,
            "asyncflow_workers": args.workers,
            "init": init,
            "systems": summaries,
            "baseline": baseline(summaries),
            "ratios": ratios(summaries, baseline(summaries)),
            "targets": targets(summaries, baseline(summaries)),
            "skipped": skipped,
            "note": "samples/s and tokens/s over training steps only; set-up excluded",
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _announce(run: SystemRun) -> SystemRun:
    samples = sum(r["samples"] for r in run.records)
    print(
        f"  {run.name}: {len(run.records)} steps, {samples / run.train_s:.1f} samples/s over "
        f"{run.train_s:.1f}s of training ({run.wall_s:.1f}s with set-up)",
        flush=True,
    )
    return run


if __name__ == "__main__":
    sys.exit(main())
