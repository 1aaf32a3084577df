"""Show a built workflow to a person: plain text for the terminal, DOT for Graphviz.

Both are plain strings so the CLI, docs and tests can use them without graphviz installed.
"""

from __future__ import annotations

import textwrap

from asyncflow.graph.dag import WorkflowGraph
from asyncflow.graph.node import Node

_WIDTH = 100
_DETAIL = " " * 6  # indent of an operator's reads/writes/edge lines under its name


def render_text(graph: WorkflowGraph) -> str:
    """Stage by stage, what each operator reads, writes and hands to whom.

    Stages are printed in run order so the text reads top to bottom like the data flows.
    """
    stages = graph.stages()
    lines = [_headline(graph, len(stages))]
    if graph.description:
        lines += textwrap.wrap(
            graph.description, _WIDTH, initial_indent="  ", subsequent_indent="  "
        )
    name_width = max(len(name) for name in graph.nodes)
    for number, stage in enumerate(stages, start=1):
        lines += ["", f"stage {number}"]
        for name in stage:
            lines += _operator_lines(graph, graph.nodes[name], name_width)
    lines += ["", "legend: -> data edge (columns it carries)   ~> weight sync"]
    return "\n".join(lines) + "\n"


def _headline(graph: WorkflowGraph, n_stages: int) -> str:
    syncs = len(graph.weight_syncs)
    return (
        f"workflow {graph.name}: {_plural(len(graph.nodes), 'operator')} in "
        f"{_plural(n_stages, 'stage')}, {_plural(syncs, 'weight sync')}"
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _operator_lines(graph: WorkflowGraph, node: Node, name_width: int) -> list[str]:
    tags = " ".join(_tags(graph, node))
    lines = [f"  {node.name.ljust(name_width)}  {tags}".rstrip()]
    if node.reads:
        lines += _wrapped("reads   ", ", ".join(node.reads))
    if node.writes:
        lines += _wrapped("writes  ", ", ".join(_typed(c, d) for c, d in node.writes.items()))
    edges = [("->", c, ", ".join(cols)) for c, cols in _out_edges(graph, node.name)]
    edges += [("~>", t, "weights") for t in graph.sync_targets(node.name)]
    width = max((len(target) for _, target, _ in edges), default=0)
    for arrow, target, label in edges:
        lines += _wrapped(f"{arrow} {target.ljust(width)}  ", label)
    return lines


def _tags(graph: WorkflowGraph, node: Node) -> list[str]:
    tags = []
    if node.replicas > 1:
        tags.append(f"x{node.replicas}")
    if node.resources:
        tags.append(" ".join(f"{k}={v:g}" for k, v in node.resources.items()))
    if node.is_source:
        tags.append("[source]")
    if graph.dag.out_degree(node.name) == 0:
        tags.append("[sink]")
    if node.has_weights:
        tags.append("[weights]")
    return tags


def _typed(column: str, dtype: str | None) -> str:
    return column if dtype is None else f"{column}: {dtype}"


def _out_edges(graph: WorkflowGraph, name: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(c, graph.dag.edges[name, c]["columns"]) for c in graph.downstream(name)]


def _wrapped(prefix: str, text: str) -> list[str]:
    """Wrap long column lists under themselves, so the prefix column stays clean."""
    first = _DETAIL + prefix
    return textwrap.wrap(
        text,
        _WIDTH,
        initial_indent=first,
        subsequent_indent=" " * len(first),
        break_long_words=False,
        break_on_hyphens=False,
    )


def render_dot(graph: WorkflowGraph) -> str:
    """Graphviz source: data edges labelled with their columns, weight syncs dashed.

    Each stage is pinned to one rank so the picture lines up with `render_text`.
    """
    lines = [
        f"digraph {_quote(graph.name)} {{",
        f"  graph [rankdir=LR, labelloc=t, label={_quote(_dot_title(graph))}];",
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    for node in graph.nodes.values():
        lines.append(f"  {_quote(node.name)} [{_node_attrs(graph, node)}];")
    for stage in graph.stages():
        members = " ".join(f"{_quote(name)};" for name in stage)
        lines.append(f"  {{ rank=same; {members} }}")
    for producer, consumer, columns in graph.edges():
        label = _quote("\n".join(columns))
        lines.append(f"  {_quote(producer)} -> {_quote(consumer)} [label={label}];")
    for source, target in graph.weight_syncs:
        lines.append(
            f"  {_quote(source)} -> {_quote(target)} "
            f'[label="weights", style=dashed, color="gray40", constraint=false];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_title(graph: WorkflowGraph) -> str:
    if graph.description:
        return f"{graph.name}: {graph.description}"
    return graph.name


def _node_attrs(graph: WorkflowGraph, node: Node) -> str:
    tags = " ".join(t for t in _tags(graph, node) if t != "[sink]")
    label = node.name if not tags else f"{node.name}\n{tags}"
    attrs = [f"label={_quote(label)}"]
    if node.is_source:
        attrs.append('style="rounded,bold"')
    if node.has_weights:
        attrs.append("peripheries=2")
    return ", ".join(attrs)


def _quote(text: str) -> str:
    """A DOT double-quoted string; newlines become DOT's own line breaks."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
