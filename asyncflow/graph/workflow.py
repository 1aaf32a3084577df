"""The user-facing DSL: declare operators and weight syncs, then `build()` a validated graph."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

from asyncflow.errors import WorkflowValidationError
from asyncflow.graph.dag import WorkflowGraph
from asyncflow.graph.node import Node, make_node
from asyncflow.graph.validate import find_problems


class Workflow:
    """A mutable declaration of operators; `build()` turns it into an immutable WorkflowGraph.

    Per-operator mistakes (bad name, replicas, column declarations) raise at `add`, where the
    traceback points at the offending line. Cross-operator mistakes can only be judged once
    everything is declared, so `build` collects them and raises them all together.
    """

    def __init__(self, name: str, description: str = "") -> None:
        self.name = name
        self.description = description
        self._nodes: dict[str, Node] = {}
        self._syncs: list[tuple[str, str]] = []

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, operators={list(self._nodes)})"

    @property
    def nodes(self) -> list[Node]:
        """Operators in the order they were added."""
        return list(self._nodes.values())

    @property
    def weight_syncs(self) -> list[tuple[str, str]]:
        """(publisher, loader) pairs in the order they were declared."""
        return list(self._syncs)

    def add(
        self,
        name: str,
        operator: object,
        replicas: int = 1,
        resources: dict[str, float] | None = None,
    ) -> Node:
        """Place `operator` in the workflow under `name`; its reads/writes decide its edges."""
        if isinstance(name, str) and name in self._nodes:
            self._fail(f"operator {name!r} is added twice; give each operator a unique name")
        node, problems = make_node(name, operator, replicas, resources)
        if node is None:
            self._fail(*problems)
        self._nodes[node.name] = node
        return node

    def sync_weights(self, source: str, to: str | Iterable[str]) -> None:
        """Declare that `source` publishes weights which every operator in `to` loads.

        Names are checked at `build`, so syncs may be declared before the operators are added.
        """
        targets = [to] if isinstance(to, str) else list(to)
        if not targets:
            self._fail(f"sync_weights({source!r}, to=[]) names no targets; list who loads them")
        for target in targets:
            if (source, target) not in self._syncs:
                self._syncs.append((source, target))

    def build(self) -> WorkflowGraph:
        """Validate the whole declaration and freeze it, raising every problem at once."""
        problems = find_problems(self.nodes, self._syncs)
        if problems:
            raise WorkflowValidationError(self.name, problems)
        return WorkflowGraph(self.name, self.nodes, self._syncs, self.description)

    def _fail(self, *problems: str) -> NoReturn:
        raise WorkflowValidationError(self.name, problems)
