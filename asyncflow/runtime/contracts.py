"""Column dtypes as declared in workflows, and the check every operator output passes.

Declarations are short strings (`list<int32>`, `float32`) so the graph layer can
compare them without importing Arrow; this module is where they become Arrow
types. An output that breaks its operator's declaration is rejected here, on the
worker, before anything reaches the queue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asyncflow.errors import OperatorError

_SCALARS: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "binary": pa.binary(),
}


def arrow_type(dtype: str) -> pa.DataType:
    """Parse a declared dtype: a scalar name or `list<...>` of one, nested as needed."""
    text = dtype.replace(" ", "")
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(arrow_type(text[5:-1]))
    if text in _SCALARS:
        return _SCALARS[text]
    known = ", ".join(sorted(_SCALARS))
    raise ValueError(f"unknown column dtype {dtype!r}; use one of {known} or list<...> of them")


def dtype_name(type_: pa.DataType) -> str:
    """Inverse of `arrow_type`, for messages that quote what the user declared."""
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return f"list<{dtype_name(type_.value_type)}>"
    for name, candidate in _SCALARS.items():
        if candidate == type_:
            return name
    return str(type_)


def check_output(
    operator: str,
    writes: Mapping[str, str | None],
    output: pa.RecordBatch | Mapping[str, pa.Array] | None,
    sample_ids: Sequence[int],
) -> pa.RecordBatch:
    """Return the output as a RecordBatch with exactly the declared columns, or raise.

    Raises OperatorError naming the operator, the column and the sample ids when a
    column is missing or extra, has the wrong length or dtype, or holds NaN/inf.
    """
    arrays = _as_mapping(operator, output, sample_ids)
    missing = [c for c in writes if c not in arrays]
    extra = [c for c in arrays if c not in writes]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing declared column(s) {missing}")
        if extra:
            parts.append(f"returned undeclared column(s) {extra}")
        raise OperatorError(operator, "; ".join(parts), sample_ids)
    columns, fields = [], []
    for name, declared in writes.items():
        array = arrays[name]
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if not isinstance(array, pa.Array):
            array = pa.array(array)
        if len(array) != len(sample_ids):
            raise OperatorError(
                operator,
                f"column {name!r} has {len(array)} rows for {len(sample_ids)} input rows",
                sample_ids,
            )
        if declared is not None and array.type != arrow_type(declared):
            raise OperatorError(
                operator,
                f"column {name!r} has dtype {dtype_name(array.type)}, declared {declared}",
                sample_ids,
            )
        _check_finite(operator, name, array, sample_ids)
        columns.append(array)
        fields.append(pa.field(name, array.type))
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


def _as_mapping(operator, output, sample_ids) -> Mapping[str, pa.Array]:
    if output is None:
        return {}
    if isinstance(output, pa.RecordBatch | pa.Table):
        return {name: output.column(name) for name in output.schema.names}
    if isinstance(output, Mapping):
        return output
    raise OperatorError(
        operator,
        f"returned {type(output).__name__}; return a dict of columns or a pyarrow.RecordBatch",
        sample_ids,
    )


def _check_finite(operator: str, name: str, array: pa.Array, sample_ids: Sequence[int]) -> None:
    values = array
    row_of = np.arange(len(array))  # row of each item of `values`
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(values)
        row_of = row_of[parents]
    if not pa.types.is_floating(values.type) or len(values) == 0:
        return
    finite = np.isfinite(values.to_numpy(zero_copy_only=False))
    if not finite.all():
        rows = sorted(set(row_of[~finite].tolist()))
        raise OperatorError(
            operator, f"column {name!r} holds NaN or inf", [sample_ids[r] for r in rows]
        )
