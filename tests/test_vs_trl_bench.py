"""benchmarks/vs_trl.py: the pieces that make the comparison fair, and a tiny run of each side.

The TRL run is skipped, saying how to install it, when trl is not installed (it is only in
the `bench-trl` extra); everything else needs transformers (the `hf` extra, as CI installs).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from asyncflow.workflows.tasks.arithmetic import ArithmeticPrompts

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import a benchmark script by path (benchmarks/ is no package; sys.path stays as is)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


trl_baseline = _load("trl_baseline")
vs_trl = _load("vs_trl")

HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(
    not HAS_TRL, reason="trl not installed: pip install -e .[bench-trl] to run the TRL side"
)
TINY = vs_trl.Setting(steps=2, prompts_per_step=4, group_size=4, warmstart_steps=0)


def test_missing_trl_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a)
    )
    with pytest.raises(SystemExit, match=r"pip install -e \.\[bench-trl\]"):
        vs_trl.require_trl()


def test_trl_gets_asyncflows_prompts_in_step_order():
    data = trl_baseline.task_prompts(steps=3, prompts_per_step=4, group_size=2, seed=7)
    source = ArithmeticPrompts(vs_trl_task(), group_size=2, seed=7)
    expected = [source.produce(step, 8).to_pydict() for step in range(3)]
    assert data["prompt_ids"] == [ids for rows in expected for ids in rows["prompt_ids"][::2]]
    assert data["answer"] == [a for rows in expected for a in rows["answer"][::2]]
    assert all(text.startswith("<bos>") and text.endswith("=") for text in data["prompt"])


def vs_trl_task():
    from asyncflow.workflows.grpo import GRPOConfig

    return GRPOConfig().task


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("vs-trl") / "qwen2"
    info = vs_trl.prepare_initial_model(TINY, path)
    assert 0.0 <= info["accuracy_before"] <= 1.0
    return path


def test_char_tokenizer_has_the_task_tokenizers_ids(model_dir):
    from transformers import PreTrainedTokenizerFast

    saved = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    vs_trl.check_tokenizer(saved)  # raises on any mismatch, after a save/load round trip
    data = trl_baseline.task_prompts(steps=1, prompts_per_step=8, group_size=2, seed=0)
    trl_baseline.check_prompt_ids(saved, data)


@pytest.mark.cluster
def test_asyncflow_grpo_trains_the_saved_transformers_model(model_dir, dask_client, tmp_path):
    from asyncflow.runtime.executor import SyncExecutor
    from asyncflow.workflows import grpo

    cfg = grpo.GRPOConfig(
        steps=2, prompts_per_step=4, group_size=4, micro_batch_size=8, hf_model=str(model_dir)
    )
    recipe = grpo.recipe(cfg, tmp_path)
    assert recipe.prepare is None  # the directory's weights are the start: no warm start
    result = SyncExecutor(recipe, dask_client, tmp_path).run()
    assert [r["samples"] for r in result.history] == [16, 16]
    assert 0.0 <= result.after["accuracy"] <= 1.0


def test_hf_model_is_refused_by_other_graphs(model_dir, tmp_path):
    from asyncflow.errors import ConfigError
    from asyncflow.workflows import ppo

    with pytest.raises(ConfigError, match="hf_model"):
        ppo.recipe(ppo.PPOConfig(hf_model=str(model_dir)), tmp_path)


@needs_trl
def test_trl_side_runs_and_reports_per_step(model_dir, tmp_path):
    args = trl_baseline.parse_args(
        [
            f"--model-dir={model_dir}",
            f"--out={tmp_path / 'trl.json'}",
            "--steps=2",
            "--prompts-per-step=4",
            "--group-size=4",
            "--threads=1",
        ]
    )
    result = trl_baseline.train(args)
    assert [r["samples"] for r in result["steps"]] == [16, 16]
    assert all(0.0 <= r["reward"] <= 1.0 and r["step_time"] > 0 for r in result["steps"])
    assert result["train_s"] > 0 and 0.0 <= result["after_accuracy"] <= 1.0
