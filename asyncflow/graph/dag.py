"""The built workflow: a networkx DAG derived from declared columns, plus queries on it.

Edges are never declared by hand. A consumer depends on a producer exactly when it
reads a column the producer writes, so the wiring cannot drift from the contracts
the operators enforce at run time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import networkx as nx

from asyncflow.graph.columns import suggest
from asyncflow.graph.node import Node


def writers_by_column(nodes: Iterable[Node]) -> dict[str, list[str]]:
    """Every writer of every column; validation needs all of them to report duplicates."""
    writers: dict[str, list[str]] = {}
    for node in nodes:
        for column in node.writes:
            writers.setdefault(column, []).append(node.name)
    return writers


def data_graph(nodes: Sequence[Node]) -> nx.DiGraph:
    """Derive producer -> consumer edges, each labelled with the sorted columns it carries.

    An operator reading its own output gets no self-loop: validation reports that
    separately, with a clearer message than "cycle of length one".
    """
    graph = nx.DiGraph()
    for node in nodes:
        graph.add_node(node.name, node=node)
    writers = writers_by_column(nodes)
    carried: dict[tuple[str, str], set[str]] = {}
    for consumer in nodes:
        for column in consumer.reads:
            for producer in writers.get(column, ()):
                if producer != consumer.name:
                    carried.setdefault((producer, consumer.name), set()).add(column)
    for (producer, consumer), columns in carried.items():
        graph.add_edge(producer, consumer, columns=tuple(sorted(columns)))
    return graph


def sync_graph(nodes: Sequence[Node], weight_syncs: Iterable[tuple[str, str]]) -> nx.DiGraph:
    """Weight-sync edges live apart from the data DAG: trainer -> rollout would close a cycle."""
    graph = nx.DiGraph()
    for node in nodes:
        graph.add_node(node.name, node=node)
    for source, target in weight_syncs:
        graph.add_edge(source, target, kind="weights")
    return graph


class WorkflowGraph:
    """A validated workflow. Build it with `Workflow.build()`, which checks it first.

    The constructor trusts its input; queries assume the graph is acyclic and that
    every column has exactly one producer.
    """

    def __init__(
        self,
        name: str,
        nodes: Iterable[Node],
        weight_syncs: Iterable[tuple[str, str]] = (),
        description: str = "",
    ) -> None:
        self.name = name
        self.description = description
        self.nodes: dict[str, Node] = {node.name: node for node in nodes}
        self.weight_syncs: tuple[tuple[str, str], ...] = tuple(weight_syncs)
        node_list = list(self.nodes.values())
        self.dag: nx.DiGraph = nx.freeze(data_graph(node_list))
        self.sync_graph: nx.DiGraph = nx.freeze(sync_graph(node_list, self.weight_syncs))
        self._index = {name: i for i, name in enumerate(self.nodes)}
        self._producer = {col: ws[0] for col, ws in writers_by_column(node_list).items()}

    def __repr__(self) -> str:
        return (
            f"WorkflowGraph({self.name!r}, operators={len(self.nodes)}, "
            f"edges={self.dag.number_of_edges()}, weight_syncs={len(self.weight_syncs)})"
        )

    def _in_order(self, names: Iterable[str]) -> list[str]:
        """Insertion order is the user's own ordering, so use it whenever a choice is free."""
        return sorted(names, key=self._index.__getitem__)

    def order(self) -> list[str]:
        """A topological order that stays the same run to run: ties go to the earlier-added node."""
        return list(nx.lexicographical_topological_sort(self.dag, key=self._index.__getitem__))

    def stages(self) -> list[list[str]]:
        """Operators grouped by topological generation: each stage needs only earlier ones."""
        return [self._in_order(gen) for gen in nx.topological_generations(self.dag)]

    def edges(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """Data edges as (producer, consumer, columns), in topological then insertion order."""
        position = {name: i for i, name in enumerate(self.order())}
        edges = [(u, v, cols) for u, v, cols in self.dag.edges(data="columns")]
        return sorted(edges, key=lambda e: (position[e[0]], self._index[e[1]]))

    def producer_of(self, column: str) -> str:
        """The one operator that writes `column`."""
        try:
            return self._producer[column]
        except KeyError:
            raise KeyError(self._unknown_column(column)) from None

    def consumers_of(self, column: str) -> list[str]:
        """Operators that read `column`, in insertion order (empty if nothing reads it)."""
        if column not in self._producer:
            raise KeyError(self._unknown_column(column))
        return [n.name for n in self.nodes.values() if column in n.reads]

    def columns(self) -> dict[str, str | None]:
        """Every column and its dtype: the producer's, else the first consumer's that names one."""
        result: dict[str, str | None] = {}
        for name in self.order():
            for column, dtype in self.nodes[name].writes.items():
                declared = [dtype] + [
                    self.nodes[c].reads[column] for c in self.consumers_of(column)
                ]
                result[column] = next((d for d in declared if d is not None), None)
        return result

    def sources(self) -> list[str]:
        """Operators that create new rows, in insertion order."""
        return [n.name for n in self.nodes.values() if n.is_source]

    def sinks(self) -> list[str]:
        """Operators whose output no other operator reads (weight syncs do not count)."""
        return [name for name in self.nodes if self.dag.out_degree(name) == 0]

    def upstream(self, name: str) -> list[str]:
        """Direct producers of the columns `name` reads, in insertion order."""
        return self._in_order(self.dag.predecessors(self._known(name)))

    def downstream(self, name: str) -> list[str]:
        """Direct consumers of the columns `name` writes, in insertion order."""
        return self._in_order(self.dag.successors(self._known(name)))

    def sync_targets(self, name: str) -> list[str]:
        """Operators that load the weights `name` publishes, in insertion order."""
        return self._in_order(self.sync_graph.successors(self._known(name)))

    def describe(self) -> dict:
        """A JSON-ready description (names, columns, edges): what run records store."""
        return {
            "name": self.name,
            "description": self.description,
            "operators": [
                {
                    "name": node.name,
                    "type": type(node.operator).__qualname__,
                    "reads": dict(node.reads),
                    "writes": dict(node.writes),
                    "replicas": node.replicas,
                    "resources": dict(node.resources),
                    "is_source": node.is_source,
                    "has_weights": node.has_weights,
                }
                for node in self.nodes.values()
            ],
            "edges": [[u, v, list(cols)] for u, v, cols in self.edges()],
            "weight_syncs": [list(edge) for edge in self.weight_syncs],
        }

    def _known(self, name: str) -> str:
        if name not in self.nodes:
            raise KeyError(
                f"workflow {self.name!r} has no operator {name!r}{suggest(name, self.nodes)}"
            )
        return name

    def _unknown_column(self, column: str) -> str:
        hint = suggest(column, self._producer)
        return f"workflow {self.name!r} has no column {column!r}{hint}"
