"""Column-by-column comparison of recorded and replayed rows.

Integer, boolean and string values must be equal; floating-point values may differ by
`atol + rtol * |recorded|` (both 0: bit-exact up to NaN == NaN). Lists compare their
lengths exactly and their items by the same rules, at any depth. Every column reports
whether it is identical, within tolerance (with the largest absolute difference), or
different, with the sample ids of the differing rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SAMPLE_ID = "sample_id"


@dataclass
class Tolerance:
    rtol: float = 1e-5
    atol: float = 1e-6

    @classmethod
    def exact(cls) -> Tolerance:
        return cls(0.0, 0.0)


@dataclass
class ColumnDiff:
    column: str
    status: str  # identical | close | different | missing | unexpected
    rows: int = 0  # rows compared
    differing: list[int] = field(default_factory=list)  # sample ids of differing rows
    max_abs_diff: float | None = None  # floating-point columns
    note: str = ""
    examples: list[tuple[int, Any, Any]] = field(default_factory=list)  # (id, recorded, replayed)

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "close")

    def line(self) -> str:
        if self.status == "close":
            detail = f"within tolerance (max |diff| {self.max_abs_diff:.3g})"
        elif self.status == "different":
            detail = f"DIFFERENT in {len(self.differing)} of {self.rows} rows"
            if self.max_abs_diff:
                detail += f" (max |diff| {self.max_abs_diff:.3g})"
        elif self.status == "missing":
            detail = "MISSING from the replay"
        elif self.status == "unexpected":
            detail = "not recorded, but the replay wrote it"
        else:
            detail = "identical"
        return f"{self.column}: {detail}" + (f"; {self.note}" if self.note else "")


def diff_tables(
    recorded: pa.Table | pa.RecordBatch,
    replayed: pa.Table | pa.RecordBatch,
    tolerance: Tolerance | None = None,
    *,
    examples: int = 5,
) -> list[ColumnDiff]:
    """Compare two tables row by row (same `sample_id`s in the same order), column by column."""
    tol = tolerance or Tolerance()
    recorded, replayed = _as_table(recorded), _as_table(replayed)
    ids = recorded.column(SAMPLE_ID).to_numpy() if SAMPLE_ID in recorded.column_names else None
    if ids is None:
        ids = np.arange(recorded.num_rows)
    if recorded.num_rows != replayed.num_rows:
        raise ValueError(
            f"cannot compare {recorded.num_rows} recorded rows with {replayed.num_rows} replayed"
        )
    both_ids = SAMPLE_ID in replayed.column_names and SAMPLE_ID in recorded.column_names
    if both_ids and not np.array_equal(ids, replayed.column(SAMPLE_ID).to_numpy()):
        raise ValueError("recorded and replayed rows are not the same samples in order")
    out = []
    for name in recorded.column_names:
        if name == SAMPLE_ID:
            continue
        if name not in replayed.column_names:
            out.append(ColumnDiff(name, "missing", recorded.num_rows))
            continue
        out.append(
            diff_column(name, recorded.column(name), replayed.column(name), ids, tol, examples)
        )
    for name in replayed.column_names:
        if name != SAMPLE_ID and name not in recorded.column_names:
            out.append(ColumnDiff(name, "unexpected", replayed.num_rows))
    return out


def diff_column(
    name: str,
    recorded: pa.Array | pa.ChunkedArray,
    replayed: pa.Array | pa.ChunkedArray,
    ids: np.ndarray,
    tol: Tolerance,
    examples: int = 5,
) -> ColumnDiff:
    a, b = _flat(recorded), _flat(replayed)
    note = ""
    if a.type != b.type:
        note = f"type changed: recorded {a.type}, replayed {b.type}"
        try:
            b = b.cast(a.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return ColumnDiff(name, "different", len(a), [int(i) for i in ids], None, note)
    mismatch, absdiff = row_mismatch(a, b, tol)
    has_float = _has_float(a.type)
    finite = absdiff[~np.isnan(absdiff)]
    max_abs = float(finite.max()) if has_float and finite.size else (0.0 if has_float else None)
    rows = np.nonzero(mismatch)[0]
    shown = [(int(ids[i]), _show(a[int(i)]), _show(b[int(i)])) for i in rows[:examples]]
    if note:  # a changed type is a difference in every row, whatever the values
        return ColumnDiff(name, "different", len(a), [int(i) for i in ids], max_abs, note, shown)
    status = "different" if rows.size else "close" if (max_abs or 0.0) > 0 else "identical"
    return ColumnDiff(name, status, len(a), [int(ids[i]) for i in rows], max_abs, note, shown)


def row_mismatch(a: pa.Array, b: pa.Array, tol: Tolerance) -> tuple[np.ndarray, np.ndarray]:
    """(rows that differ, largest |difference| per row (NaN: not numeric or no items))."""
    n = len(a)
    null_a = _is_null(a)
    null_b = _is_null(b)
    mismatch = null_a != null_b
    both = ~null_a & ~null_b
    absdiff = np.full(n, np.nan)
    if n == 0:
        return mismatch, absdiff
    t = a.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        len_a = pc.list_value_length(a).fill_null(-1).to_numpy(zero_copy_only=False)
        len_b = pc.list_value_length(b).fill_null(-1).to_numpy(zero_copy_only=False)
        mismatch |= both & (len_a != len_b)
        same = both & (len_a == len_b)
        if same.any():
            keep = pa.array(same)
            items_a = pc.list_flatten(a.filter(keep))
            items_b = pc.list_flatten(b.filter(keep))
            item_bad, item_abs = row_mismatch(items_a, items_b, tol)
            owner = np.repeat(np.nonzero(same)[0], len_a[same])
            if item_bad.any():
                mismatch[np.unique(owner[item_bad])] = True
            numeric = ~np.isnan(item_abs)
            if numeric.any():
                absdiff[np.unique(owner[numeric])] = 0.0
                np.fmax.at(absdiff, owner[numeric], item_abs[numeric])
        return mismatch, absdiff
    if pa.types.is_floating(t):
        x = _floats(a)
        y = _floats(b)
        close = np.isclose(y, x, rtol=tol.rtol, atol=tol.atol, equal_nan=True)
        if tol.rtol == 0 and tol.atol == 0:  # bit-exact, but NaN == NaN and 0.0 == -0.0
            close = (x == y) | (np.isnan(x) & np.isnan(y))
        mismatch |= both & ~close
        with np.errstate(invalid="ignore"):
            diff = np.abs(x - y)
        diff[np.isnan(diff) & (np.isnan(x) == np.isnan(y))] = 0.0  # inf == inf, nan == nan
        absdiff = np.where(both, diff, np.nan)
        return mismatch, absdiff
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        x = a.fill_null(0).to_numpy(zero_copy_only=False)
        y = b.fill_null(0).to_numpy(zero_copy_only=False)
        mismatch |= both & (x != y)
        return mismatch, absdiff
    try:
        equal = pc.equal(a, b).fill_null(True).to_numpy(zero_copy_only=False)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        equal = np.array([x == y for x, y in zip(a.to_pylist(), b.to_pylist(), strict=True)])
    mismatch |= both & ~equal
    return mismatch, absdiff


def _flat(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _as_table(data: pa.Table | pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data


def _is_null(a: pa.Array) -> np.ndarray:
    if a.null_count == 0:
        return np.zeros(len(a), dtype=bool)
    return a.is_null().to_numpy(zero_copy_only=False)


def _floats(a: pa.Array) -> np.ndarray:
    return a.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


def _has_float(t: pa.DataType) -> bool:
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


def _show(scalar: pa.Scalar, width: int = 72) -> str:
    text = repr(scalar.as_py())
    return text if len(text) <= width else text[: width - 3] + "..."
