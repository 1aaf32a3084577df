"""Whole-workflow checks. Each returns a list of problems instead of raising, so `build`
can report every mistake in one error rather than one per rerun.

Every message names the operator(s) and column(s) involved and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import networkx as nx

from asyncflow.graph.columns import dtypes_conflict, quote_list, suggest
from asyncflow.graph.dag import data_graph, writers_by_column
from asyncflow.graph.node import Node


def find_problems(nodes: Sequence[Node], weight_syncs: Sequence[tuple[str, str]]) -> list[str]:
    """Run every check; an empty list means the workflow is valid."""
    if not nodes:
        return ["workflow has no operators; add them with Workflow.add(name, operator)"]
    writers = writers_by_column(nodes)
    return [
        *check_missing_producers(nodes, writers),
        *check_duplicate_writers(writers),
        *check_self_reads(nodes),
        *check_sources(nodes),
        *check_dtypes(nodes, writers),
        *check_cycles(nodes),
        *check_weight_syncs(nodes, weight_syncs),
    ]


def check_missing_producers(nodes: Sequence[Node], writers: dict[str, list[str]]) -> list[str]:
    problems = []
    for node in nodes:
        for column in node.reads:
            if column not in writers:
                problems.append(
                    f"operator {node.name!r} reads column {column!r}, which no operator writes; "
                    f"add a producer or fix the name{suggest(column, writers)}"
                )
    return problems


def check_duplicate_writers(writers: dict[str, list[str]]) -> list[str]:
    """Rows are merged by column, so two writers of one column would overwrite each other."""
    return [
        f"column {column!r} is written by operators {quote_list(names)}; "
        f"each column needs exactly one producer, so rename the column in all but one"
        for column, names in writers.items()
        if len(names) > 1
    ]


def check_self_reads(nodes: Sequence[Node]) -> list[str]:
    """In-place updates would make a row's meaning depend on whether the operator has run yet."""
    return [
        f"operator {node.name!r} reads and writes column {column!r}; "
        f"write the result to a new column (e.g. {column + '_out'!r}) instead"
        for node in nodes
        for column in node.reads
        if column in node.writes
    ]


def check_sources(nodes: Sequence[Node]) -> list[str]:
    problems = []
    for node in nodes:
        if node.is_source and node.reads:
            problems.append(
                f"source operator {node.name!r} reads columns {quote_list(node.reads)}; "
                f"a source creates new rows and reads nothing, so drop the reads "
                f"or declare is_source=False"
            )
        elif not node.is_source and not node.reads:
            problems.append(
                f"operator {node.name!r} reads no columns but is not a source; "
                f"declare is_source=True if it produces new rows, or declare the columns it reads"
            )
    if not any(node.is_source for node in nodes):
        problems.append(
            "workflow has no source operator; declare is_source=True on the operator "
            "that produces new rows (e.g. the prompt/task loader)"
        )
    return problems


def check_dtypes(nodes: Sequence[Node], writers: dict[str, list[str]]) -> list[str]:
    by_name = {node.name: node for node in nodes}
    problems = []
    for consumer in nodes:
        for column, wanted in consumer.reads.items():
            for producer in writers.get(column, ()):
                written = by_name[producer].writes[column]
                if producer != consumer.name and dtypes_conflict(written, wanted):
                    problems.append(
                        f"column {column!r} is written by operator {producer!r} as {written!r} "
                        f"but read by operator {consumer.name!r} as {wanted!r}; make the dtypes "
                        f"agree, or declare the read dtype as None to accept any"
                    )
    return problems


def check_cycles(nodes: Sequence[Node]) -> list[str]:
    """Report one cycle per strongly connected component: enough to locate every loop."""
    graph = data_graph(nodes)
    index = {node.name: i for i, node in enumerate(nodes)}
    problems = []
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        cycle = _shortest_cycle(graph.subgraph(component), min(component, key=index.__getitem__))
        problems.append(
            f"operators form a cycle: {_describe_cycle(graph, cycle)}; a workflow must be "
            f"acyclic, so remove one of these reads (to feed a trainer's weights back "
            f"to rollout, use sync_weights instead)"
        )
    return problems


def _shortest_cycle(graph: nx.DiGraph, start: str) -> list[str]:
    """Shortest cycle through `start`; the first-added operator anchors it so output is stable."""
    best: list[str] | None = None
    for successor in graph.successors(start):
        path = nx.shortest_path(graph, successor, start)
        if best is None or len(path) < len(best):
            best = path
    assert best is not None  # start is in a non-trivial strongly connected component
    return [start, *best]


def _describe_cycle(graph: nx.DiGraph, cycle: list[str]) -> str:
    """'a' -[x]-> 'b' -[y, z]-> 'a': operators in order with the columns on each edge."""
    text = repr(cycle[0])
    for producer, consumer in pairwise(cycle):
        columns = ", ".join(graph.edges[producer, consumer]["columns"])
        text += f" -[{columns}]-> {consumer!r}"
    return text


def check_weight_syncs(nodes: Sequence[Node], weight_syncs: Sequence[tuple[str, str]]) -> list[str]:
    by_name = {node.name: node for node in nodes}
    problems: dict[str, None] = {}  # ordered set: one operator may appear in several syncs
    for source, target in weight_syncs:
        if source == target and source in by_name:
            problems[
                f"operator {source!r} syncs weights to itself; "
                f"a weight sync must go to a different operator"
            ] = None
            continue
        for role, name in (("source", source), ("target", target)):
            if name not in by_name:
                problems[
                    f"weight sync {source!r} ~> {target!r} names unknown {role} operator "
                    f"{name!r}; add it to the workflow or fix the name{suggest(name, by_name)}"
                ] = None
            elif not by_name[name].has_weights:
                problems[
                    f"operator {name!r} is a weight-sync {role} but holds no weights; "
                    f"set has_weights=True on it or drop its weight syncs"
                ] = None
    return list(problems)
