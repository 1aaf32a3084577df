"""Column declarations: the only thing the graph knows about an operator's data.

Operators declare the columns they read and write; edges are derived from them,
so these helpers turn a loose declaration into one canonical shape and compare
dtypes without knowing what a dtype *is* (dtype strings stay opaque here, so
graph/ never depends on Arrow).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

Columns = dict[str, str | None]


def normalise_dtype(dtype: str | None) -> str | None:
    """Drop whitespace so 'list< int32 >' and 'list<int32>' count as the same dtype."""
    if dtype is None:
        return None
    return "".join(dtype.split())


def normalise_columns(spec: object) -> Columns:
    """Accept a mapping name -> dtype or a list/tuple of names; raise ValueError when neither.

    A bare string is rejected on purpose: ``reads = "prompt"`` would otherwise be read
    as the six columns 'p', 'r', 'o', ...
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple, set, frozenset)):
        items = [(name, None) for name in _stable(spec)]
    else:
        raise ValueError(
            f"expected a mapping column -> dtype or a list of column names, "
            f"got {type(spec).__name__} {spec!r}"
        )
    columns: Columns = {}
    for name, dtype in items:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"column names must be non-empty strings, got {name!r}")
        if dtype is not None and not isinstance(dtype, str):
            raise ValueError(
                f"dtype of column {name!r} must be a string or None, got {type(dtype).__name__}"
            )
        columns[name] = normalise_dtype(dtype)
    return columns


def _stable(names: Iterable[object]) -> list[object]:
    """Sets have no order; sort them so the same declaration always renders the same way."""
    if isinstance(names, (set, frozenset)):
        return sorted(names, key=repr)
    return list(names)


def dtypes_conflict(a: str | None, b: str | None) -> bool:
    """None means 'any dtype', so only two concrete, different dtypes conflict."""
    return a is not None and b is not None and a != b


def suggest(name: str, known: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for a likely typo, or '' when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(set(known)), n=1)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def quote_list(names: Iterable[str]) -> str:
    """'a', 'b' and 'c' -- reads naturally inside an error message."""
    quoted = [repr(n) for n in names]
    if len(quoted) <= 1:
        return "".join(quoted)
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]
