"""Input checks shared by operators: each failure is an OperatorError naming the rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

from asyncflow.errors import OperatorError
from asyncflow.operators.tensors import list_lengths


def sample_ids(batch: pa.RecordBatch, rows: Iterable[int] | None = None) -> list[int]:
    """The `sample_id`s of `rows` (all rows if None), or the row indices without that column."""
    rows = range(batch.num_rows) if rows is None else list(rows)
    if "sample_id" not in batch.schema.names:
        return [int(i) for i in rows]
    ids = batch.column("sample_id").to_pylist()
    return [ids[i] for i in rows]


def require_same_lengths(
    operator: str, batch: pa.RecordBatch, reference: str, columns: Sequence[str]
) -> None:
    """Every list column in `columns` has, row by row, as many items as `reference`."""
    want = list_lengths(batch.column(reference))
    for name in columns:
        got = list_lengths(batch.column(name))
        bad = np.flatnonzero(got != want)
        if len(bad):
            i = int(bad[0])
            raise OperatorError(
                operator,
                f"column {name!r} has {int(got[i])} items where {reference!r} has "
                f"{int(want[i])} (row {i}); they must align token by token",
                sample_ids(batch, bad.tolist()),
            )


def require_finite(operator: str, batch: pa.RecordBatch, columns: Sequence[str]) -> None:
    """No NaN/inf in the numeric (or list-of-numeric) `columns`."""
    for name in columns:
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            lengths = list_lengths(column)
            flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
            row_of = np.repeat(np.arange(len(lengths)), lengths)
            bad = np.unique(row_of[~np.isfinite(flat)])
        else:
            values = column.to_numpy(zero_copy_only=False).astype(np.float64)
            bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise OperatorError(
                operator, f"column {name!r} holds NaN/inf", sample_ids(batch, bad.tolist())
            )


def require_nonempty(operator: str, batch: pa.RecordBatch, column: str, why: str) -> None:
    """Every row of list column `column` has at least one item."""
    bad = np.flatnonzero(list_lengths(batch.column(column)) == 0)
    if len(bad):
        raise OperatorError(
            operator,
            f"column {column!r} is empty in {len(bad)} rows: {why}",
            sample_ids(batch, bad),
        )
