"""A declared operator placed in a workflow, with its contract captured at declaration time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from asyncflow.graph.columns import Columns, normalise_columns

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Node:
    """One operator in a workflow.

    The contract (reads, writes, flags) is copied off the operator when it is added,
    so later changes to the operator object cannot silently change a built graph.
    """

    name: str
    operator: object = field(repr=False)
    reads: Columns
    writes: Columns
    replicas: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    is_source: bool = False
    has_weights: bool = False

    def __hash__(self) -> int:
        # Names are unique within a workflow, and the generated hash would choke on the dicts.
        return hash(self.name)


def make_node(
    name: object,
    operator: object,
    replicas: object = 1,
    resources: object = None,
) -> tuple[Node | None, list[str]]:
    """Build a Node, or return every problem with its declaration so `add` reports them at once."""
    problems = _check_name(name)
    label = f"operator {name!r}" if isinstance(name, str) and name else "operator"
    problems += _check_replicas(label, replicas)
    res, res_problems = _check_resources(label, resources)
    problems += res_problems
    reads: Columns = {}
    writes: Columns = {}
    for attr in ("reads", "writes"):
        try:
            cols = normalise_columns(getattr(operator, attr, None))
        except ValueError as exc:
            problems.append(f"{label} declares invalid {attr}: {exc}")
            continue
        if attr == "reads":
            reads = cols
        else:
            writes = cols
    flags: dict[str, bool] = {}
    for attr in ("is_source", "has_weights"):
        value = getattr(operator, attr, False)
        if not isinstance(value, bool):
            problems.append(
                f"{label}: `{attr}` must be a bool attribute, got {type(value).__name__}; "
                f"set `{attr} = True` or `False` on the operator"
            )
        flags[attr] = value is True
    if problems:
        return None, problems
    node = Node(
        name=name,  # type: ignore[arg-type]  # checked by _check_name
        operator=operator,
        reads=reads,
        writes=writes,
        replicas=replicas,  # type: ignore[arg-type]  # checked by _check_replicas
        resources=res,
        **flags,
    )
    return node, []


def _check_name(name: object) -> list[str]:
    if not isinstance(name, str) or not name:
        return [f"operator name {name!r} is empty or not a string; give every operator a name"]
    if not _NAME.match(name):
        return [
            f"operator name {name!r} is not valid; use letters, digits, '_' and '-', "
            f"starting with a letter or '_'"
        ]
    return []


def _check_replicas(label: str, replicas: object) -> list[str]:
    # bool is an int subclass, but replicas=True is surely a mistake.
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        return [f"{label} has replicas={replicas!r}; replicas must be an int >= 1"]
    return []


def _check_resources(label: str, resources: object) -> tuple[dict[str, float], list[str]]:
    if resources is None:
        return {}, []
    if not isinstance(resources, dict):
        return {}, [
            f"{label} has resources={resources!r}; pass a dict like {{'GPU': 1}} "
            f"(resource name -> amount)"
        ]
    out: dict[str, float] = {}
    problems: list[str] = []
    for key, amount in resources.items():
        number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
        if not isinstance(key, str) or not number or amount < 0:
            problems.append(
                f"{label} has resource {key!r}: {amount!r}; resource names must be strings "
                f"and amounts non-negative numbers"
            )
            continue
        out[key] = float(amount)
    return out, problems
