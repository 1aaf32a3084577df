"""asyncflow.graph: building, validating and rendering workflows from declared columns."""

from __future__ import annotations

import dataclasses
import re

import networkx as nx
import pytest

from asyncflow.errors import AsyncflowError, WorkflowValidationError
from asyncflow.graph import Node, Workflow, WorkflowGraph, render_dot, render_text


class Op:
    """A stand-in operator: the graph only ever looks at these attributes."""

    def __init__(self, reads=(), writes=(), *, is_source=False, has_weights=False):
        self.reads = reads
        self.writes = writes
        self.is_source = is_source
        self.has_weights = has_weights


class Bare:
    """An operator without the optional flags, to check they default to False."""

    def __init__(self, reads, writes):
        self.reads = reads
        self.writes = writes


def source(*writes: str) -> Op:
    return Op(writes=list(writes), is_source=True)


def grpo_workflow() -> Workflow:
    wf = Workflow("grpo", description="GRPO on toy prompts")
    wf.add("prompts", Op(writes={"prompt_ids": "list<int32>", "answer": "string"}, is_source=True))
    wf.add(
        "rollout",
        Op(
            reads={"prompt_ids": "list< int32 >"},
            writes={"response_ids": "list<int32>", "rollout_logprob": "list<float32>"},
            has_weights=True,
        ),
        replicas=2,
        resources={"GPU": 1},
    )
    wf.add("reward", Op(reads=["answer", "response_ids"], writes={"reward": "float32"}))
    wf.add("ref", Op(reads=("prompt_ids", "response_ids"), writes={"ref_logprob": None}))
    wf.add("advantage", Op(reads={"reward": None}, writes={"advantage": "float32"}))
    actor_reads = ["prompt_ids", "response_ids", "rollout_logprob", "ref_logprob", "advantage"]
    wf.add("actor", Op(reads=actor_reads, writes={}, has_weights=True))
    wf.sync_weights("actor", to=["rollout"])
    return wf


@pytest.fixture
def grpo() -> WorkflowGraph:
    return grpo_workflow().build()


def build_errors(wf: Workflow) -> WorkflowValidationError:
    with pytest.raises(WorkflowValidationError) as info:
        wf.build()
    return info.value


def the_problem(wf: Workflow, *needles: str) -> str:
    """The one problem that mentions every needle; fails if none or several do."""
    error = build_errors(wf)
    hits = [p for p in error.problems if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem naming {needles}, got {error.problems}"
    return hits[0]


# --- a valid GRPO workflow ----------------------------------------------------------------


def test_grpo_edges_carry_exactly_the_shared_columns(grpo: WorkflowGraph) -> None:
    edges = {(u, v): cols for u, v, cols in grpo.dag.edges(data="columns")}
    assert edges == {
        ("prompts", "rollout"): ("prompt_ids",),
        ("prompts", "reward"): ("answer",),
        ("prompts", "ref"): ("prompt_ids",),
        ("prompts", "actor"): ("prompt_ids",),
        ("rollout", "reward"): ("response_ids",),
        ("rollout", "ref"): ("response_ids",),
        ("rollout", "actor"): ("response_ids", "rollout_logprob"),
        ("reward", "advantage"): ("reward",),
        ("ref", "actor"): ("ref_logprob",),
        ("advantage", "actor"): ("advantage",),
    }
    assert grpo.edges()[0] == ("prompts", "rollout", ("prompt_ids",))
    assert grpo.dag.nodes["rollout"]["node"] is grpo.nodes["rollout"]


def test_grpo_order_stages_sources_sinks(grpo: WorkflowGraph) -> None:
    assert list(grpo.nodes) == ["prompts", "rollout", "reward", "ref", "advantage", "actor"]
    assert grpo.order() == ["prompts", "rollout", "reward", "ref", "advantage", "actor"]
    assert grpo.stages() == [["prompts"], ["rollout"], ["reward", "ref"], ["advantage"], ["actor"]]
    assert grpo.sources() == ["prompts"]
    assert grpo.sinks() == ["actor"]
    assert grpo.upstream("actor") == ["prompts", "rollout", "ref", "advantage"]
    assert grpo.downstream("prompts") == ["rollout", "reward", "ref", "actor"]


def test_grpo_column_queries(grpo: WorkflowGraph) -> None:
    assert grpo.producer_of("response_ids") == "rollout"
    assert grpo.consumers_of("response_ids") == ["reward", "ref", "actor"]
    assert grpo.consumers_of("advantage") == ["actor"]
    assert grpo.columns() == {
        "prompt_ids": "list<int32>",
        "answer": "string",
        "response_ids": "list<int32>",
        "rollout_logprob": "list<float32>",
        "reward": "float32",
        "ref_logprob": None,
        "advantage": "float32",
    }
    with pytest.raises(KeyError, match="did you mean 'reward'"):
        grpo.producer_of("rewrd")
    with pytest.raises(KeyError, match="no operator 'nope'"):
        grpo.upstream("nope")


def test_weight_syncs_stay_out_of_the_data_dag(grpo: WorkflowGraph) -> None:
    assert grpo.weight_syncs == (("actor", "rollout"),)
    assert not grpo.dag.has_edge("actor", "rollout")
    assert nx.is_directed_acyclic_graph(grpo.dag)
    assert list(grpo.sync_graph.edges) == [("actor", "rollout")]
    assert grpo.sync_targets("actor") == ["rollout"]


def test_built_graph_is_frozen_and_nodes_capture_the_contract(grpo: WorkflowGraph) -> None:
    assert nx.is_frozen(grpo.dag)
    rollout = grpo.nodes["rollout"]
    assert isinstance(rollout, Node)
    assert rollout.replicas == 2
    assert rollout.resources == {"GPU": 1.0}
    assert rollout.reads == {"prompt_ids": "list<int32>"}  # whitespace normalised
    assert rollout.has_weights and not rollout.is_source
    assert grpo.nodes["reward"].reads == {"answer": None, "response_ids": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        rollout.replicas = 3  # type: ignore[misc]
    assert hash(rollout) == hash("rollout")


def test_workflow_keeps_declaration_order() -> None:
    wf = grpo_workflow()
    wf.sync_weights("actor", to="ref")
    wf.sync_weights("actor", to=["rollout"])  # duplicate: kept once
    assert [n.name for n in wf.nodes] == [
        "prompts",
        "rollout",
        "reward",
        "ref",
        "advantage",
        "actor",
    ]
    assert wf.weight_syncs == [("actor", "rollout"), ("actor", "ref")]


def test_ties_in_order_follow_insertion_not_names() -> None:
    wf = Workflow("ties")
    wf.add("src", source("x"))
    wf.add("zeta", Bare(reads=["x"], writes=["z"]))
    wf.add("alpha", Bare(reads=["x"], writes=["a"]))
    wf.add("join", Bare(reads=["a", "z"], writes=[]))
    graph = wf.build()
    assert graph.order() == ["src", "zeta", "alpha", "join"]
    assert graph.stages() == [["src"], ["zeta", "alpha"], ["join"]]
    assert graph.nodes["zeta"].is_source is False
    assert graph.nodes["zeta"].has_weights is False


# --- checks made when an operator is added ------------------------------------------------


def test_duplicate_operator_name_raises_at_add() -> None:
    wf = Workflow("dup")
    wf.add("gen", source("x"))
    with pytest.raises(WorkflowValidationError) as info:
        wf.add("gen", source("y"))
    assert info.value.workflow == "dup"
    assert len(info.value.problems) == 1
    assert "'gen'" in info.value.problems[0] and "unique" in info.value.problems[0]


@pytest.mark.parametrize("replicas", [0, -1, 1.5, True, "2"])
def test_bad_replicas_raise_at_add(replicas: object) -> None:
    wf = Workflow("r")
    with pytest.raises(WorkflowValidationError, match=r"operator 'gen' has replicas=.*>= 1"):
        wf.add("gen", source("x"), replicas=replicas)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "two words", "1st", None])
def test_bad_operator_names_raise_at_add(name: object) -> None:
    with pytest.raises(WorkflowValidationError, match="operator name"):
        Workflow("n").add(name, source("x"))  # type: ignore[arg-type]


def test_bad_declarations_raise_at_add_with_every_problem() -> None:
    bad = Op(reads="prompt", writes={"y": 3}, is_source="yes")  # type: ignore[arg-type]
    with pytest.raises(WorkflowValidationError) as info:
        Workflow("decl").add("gen", bad, replicas=0, resources={"GPU": -1})
    problems = info.value.problems
    assert len(problems) == 5
    assert all("'gen'" in p for p in problems)
    assert any("invalid reads" in p and "str" in p for p in problems)
    assert any("invalid writes" in p and "'y'" in p for p in problems)
    assert any("is_source" in p for p in problems)
    assert any("resource 'GPU'" in p for p in problems)


def test_sync_weights_needs_a_target() -> None:
    with pytest.raises(WorkflowValidationError, match="names no targets"):
        Workflow("s").sync_weights("actor", to=[])


# --- checks made by build -------------------------------------------------------------------


def test_read_without_producer_suggests_a_close_name() -> None:
    wf = Workflow("w")
    wf.add("gen", source("answers"))
    wf.add("reward", Op(reads=["answer"], writes=["score"]))
    problem = the_problem(wf, "'reward'", "'answer'")
    assert problem == (
        "operator 'reward' reads column 'answer', which no operator writes; "
        "add a producer or fix the name; did you mean 'answers'?"
    )


def test_read_without_producer_and_nothing_close() -> None:
    wf = Workflow("w")
    wf.add("gen", source("prompt_ids"))
    wf.add("reward", Op(reads=["zzz"], writes=["score"]))
    problem = the_problem(wf, "'reward'", "'zzz'", "no operator writes")
    assert "did you mean" not in problem


def test_column_written_twice_names_both_writers() -> None:
    wf = Workflow("w")
    wf.add("gen", source("x"))
    wf.add("a", Op(reads=["x"], writes=["score"]))
    wf.add("b", Op(reads=["x"], writes=["score"]))
    the_problem(wf, "column 'score'", "'a' and 'b'", "exactly one producer")


def test_cycle_names_operators_in_order_and_edge_columns() -> None:
    wf = Workflow("w")
    wf.add("gen", source("seed"))
    wf.add("b", Op(reads=["seed", "feedback"], writes=["draft"]))
    wf.add("c", Op(reads=["draft"], writes=["critique"]))
    wf.add("d", Op(reads=["critique"], writes=["feedback"]))
    problem = the_problem(wf, "cycle")
    assert "'b' -[draft]-> 'c' -[critique]-> 'd' -[feedback]-> 'b'" in problem
    assert "sync_weights" in problem


def test_non_source_reading_nothing() -> None:
    wf = Workflow("w")
    wf.add("gen", source("x"))
    wf.add("loader", Bare(reads=[], writes=["y"]))
    the_problem(wf, "operator 'loader' reads no columns", "is_source=True")


def test_source_that_reads_columns() -> None:
    wf = Workflow("w")
    wf.add("gen", source("x"))
    wf.add("regen", Op(reads=["x"], writes=["y"], is_source=True))
    the_problem(wf, "source operator 'regen' reads columns 'x'")


def test_workflow_without_a_source() -> None:
    wf = Workflow("w")
    wf.add("a", Op(reads=["y"], writes=["x"]))
    wf.add("b", Op(reads=["x"], writes=["y"]))
    the_problem(wf, "no source operator", "is_source=True")


def test_empty_workflow() -> None:
    the_problem(Workflow("w"), "no operators")


def test_dtype_mismatch_names_both_operators_column_and_dtypes() -> None:
    wf = Workflow("w")
    wf.add("gen", Op(writes={"x": "list<int32>"}, is_source=True))
    wf.add("use", Op(reads={"x": "list<float32>"}, writes=["y"]))
    the_problem(wf, "column 'x'", "'gen'", "'list<int32>'", "'use'", "'list<float32>'")


def test_dtypes_compare_without_whitespace_and_none_matches_anything() -> None:
    wf = Workflow("w")
    wf.add("gen", Op(writes={"x": "list<int32>", "y": None}, is_source=True))
    wf.add("a", Op(reads={"x": " list< int32 > "}, writes=["a"]))
    wf.add("b", Op(reads={"x": None, "y": "float32"}, writes=["b"]))
    graph = wf.build()
    assert graph.columns()["y"] == "float32"  # producer said "any"; the consumer is specific


def test_weight_sync_to_unknown_operator_suggests_name(grpo: WorkflowGraph) -> None:
    wf = grpo_workflow()
    wf.sync_weights("actor", to=["rolout"])
    problem = the_problem(wf, "'rolout'", "unknown target")
    assert "did you mean 'rollout'" in problem
    wf.sync_weights("actr", to=["rollout"])
    the_problem(wf, "'actr'", "unknown source")


def test_weight_sync_to_itself() -> None:
    wf = grpo_workflow()
    wf.sync_weights("actor", to="actor")
    the_problem(wf, "operator 'actor' syncs weights to itself")


def test_weight_sync_sides_must_hold_weights() -> None:
    wf = grpo_workflow()
    wf.sync_weights("actor", to=["reward"])
    wf.sync_weights("advantage", to=["rollout", "actor"])
    error = build_errors(wf)
    assert error.problems == [
        "operator 'advantage' is a weight-sync source but holds no weights; "
        "set has_weights=True on it or drop its weight syncs",
        "operator 'reward' is a weight-sync target but holds no weights; "
        "set has_weights=True on it or drop its weight syncs",
    ]


def test_operator_reading_and_writing_the_same_column() -> None:
    wf = Workflow("w")
    wf.add("gen", source("reward"))
    wf.add("clip", Op(reads=["reward"], writes=["reward"]))
    problem = the_problem(wf, "operator 'clip' reads and writes column 'reward'")
    assert "new column" in problem


def test_every_problem_is_reported_in_one_error() -> None:
    wf = Workflow("messy")
    wf.add("gen", Op(writes={"x": "int64"}, is_source=True))
    wf.add("a", Op(reads={"x": "string", "missing": None}, writes=["x2"]))
    wf.add("b", Op(reads=["x2"], writes=["x2", "y"]))
    wf.add("c", Op(reads=["y"], writes=["y"]))
    wf.sync_weights("c", to=["ghost"])
    error = build_errors(wf)
    assert isinstance(error, AsyncflowError)
    assert error.workflow == "messy"
    assert error.problems == sorted(error.problems)
    expected = [
        ("'a'", "'missing'", "no operator writes"),
        ("column 'x2'", "'a' and 'b'"),
        ("column 'y'", "'b' and 'c'"),
        ("'gen'", "'int64'", "'a'", "'string'"),
        ("operator 'b' reads and writes column 'x2'",),
        ("operator 'c' reads and writes column 'y'",),
        ("'ghost'", "unknown target"),
        ("operator 'c' is a weight-sync source but holds no weights",),
    ]
    for needles in expected:
        assert any(all(n in p for n in needles) for p in error.problems), needles
    assert len(error.problems) == len(expected)
    assert str(error).startswith(f"workflow 'messy': {len(expected)} errors found:\n  - ")


# --- rendering ------------------------------------------------------------------------------


def test_render_text_shows_stages_operators_and_edge_columns(grpo: WorkflowGraph) -> None:
    text = render_text(grpo)
    lines = text.splitlines()
    assert lines[0] == "workflow grpo: 6 operators in 5 stages, 1 weight sync"
    assert "GRPO on toy prompts" in text
    for name in grpo.nodes:
        assert any(line.startswith(f"  {name} ") or line == f"  {name}" for line in lines), name
    assert [line for line in lines if line.startswith("stage ")] == [
        f"stage {i}" for i in range(1, 6)
    ]
    assert re.search(r"\n +-> actor +response_ids, rollout_logprob\n", text)
    assert re.search(r"\n +-> advantage +reward\n", text)
    assert re.search(r"\n +~> rollout +weights\n", text)
    assert "x2" in text and "GPU=1" in text and "[source]" in text and "[sink]" in text
    assert "writes  response_ids: list<int32>, rollout_logprob: list<float32>" in text
    assert (
        text.index("stage 3") < text.index("  reward") < text.index("  ref") < text.index("stage 4")
    )


def test_render_text_wraps_long_column_lists() -> None:
    wf = Workflow("wide")
    many = [f"column_number_{i}" for i in range(20)]
    wf.add("gen", source(*many))
    wf.add("use", Bare(reads=many, writes=[]))
    text = render_text(wf.build())
    assert max(len(line) for line in text.splitlines()) <= 100
    assert all(c in text for c in many)


def test_render_dot_is_graphviz_source(grpo: WorkflowGraph) -> None:
    dot = render_dot(grpo)
    assert dot.startswith('digraph "grpo" {')
    assert dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    assert '"prompts" -> "rollout" [label="prompt_ids"];' in dot
    assert '"rollout" -> "actor" [label="response_ids\\nrollout_logprob"];' in dot
    sync = [line for line in dot.splitlines() if '"actor" -> "rollout"' in line]
    assert len(sync) == 1 and "dashed" in sync[0]
    assert dot.count(" -> ") == grpo.dag.number_of_edges() + len(grpo.weight_syncs)


def test_render_dot_escapes_quotes() -> None:
    wf = Workflow("q", description='say "hi" \\ bye')
    wf.add("gen", source("x"))
    dot = render_dot(wf.build())
    assert 'label="q: say \\"hi\\" \\\\ bye"' in dot
