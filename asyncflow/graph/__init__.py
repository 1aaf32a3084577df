"""Declare an RL workflow as a DAG of operators; edges follow from the columns they declare.

This package knows nothing of Dask, Arrow or torch: operators are opaque objects that
only need `reads` and `writes` (plus optional `is_source` / `has_weights` flags), so the
graph can be built, checked and drawn without starting anything.
"""

from asyncflow.graph.dag import WorkflowGraph
from asyncflow.graph.node import Node
from asyncflow.graph.render import render_dot, render_text
from asyncflow.graph.workflow import Workflow

__all__ = ["Node", "Workflow", "WorkflowGraph", "render_dot", "render_text"]
