"""The command line: help texts, graph printing, and clear errors for bad arguments."""

from __future__ import annotations

import pytest

from asyncflow.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "graph" in out


def test_run_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for option in ("--steps", "--run-dir", "--scheduler", "--set"):
        assert option in out


def test_graph_grpo_prints_operators_and_edge_columns(capsys):
    assert main(["graph", "grpo"]) == 0
    out = capsys.readouterr().out
    for name in ("prompts", "rollout", "reward", "advantage", "actor"):
        assert name in out
    assert "rollout_logprob" in out and "~> rollout" in out


def test_graph_follows_config_overrides(capsys):
    assert main(["graph", "grpo", "--set", "kl_coef=0.1"]) == 0
    assert "ref_logprob" in capsys.readouterr().out


def test_graph_dot(capsys):
    assert main(["graph", "grpo", "--dot"]) == 0
    assert capsys.readouterr().out.startswith("digraph")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["graph", "nope"], "unknown workflow 'nope'"),
        (["graph", "grpo", "--set", "bogus=1"], "bogus"),
        (["graph", "grpo", "--set", "lr=fast"], "not a valid float"),
    ],
)
def test_bad_arguments_give_clear_errors(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
