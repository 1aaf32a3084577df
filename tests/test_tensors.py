"""asyncflow.operators.tensors: Arrow list columns <-> padded torch tensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncflow.operators.tensors import (
    list_lengths,
    list_to_padded,
    padded_to_list,
    sequences_to_list,
)

I32 = pa.list_(pa.int32())
F32 = pa.list_(pa.float32())


def col(rows, type_=I32) -> pa.ListArray:
    return pa.array(rows, type=type_)


# --- exact layouts on hand-built examples ---------------------------------------------------


def test_right_padding_exact_values_and_mask():
    tensor, mask = list_to_padded(col([[1, 2, 3], [], [4]]))
    assert tensor.dtype == torch.int32
    assert tensor.tolist() == [[1, 2, 3], [0, 0, 0], [4, 0, 0]]
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, False, False]]


def test_left_padding_exact_values_and_mask():
    tensor, mask = list_to_padded(col([[1, 2, 3], [], [4, 5]]), left=True)
    assert tensor.tolist() == [[1, 2, 3], [0, 0, 0], [0, 4, 5]]
    assert mask.tolist() == [[True, True, True], [False, False, False], [False, True, True]]
    # The mask must be a usable (contiguous) tensor, not a negative-stride view.
    assert mask.is_contiguous()


def test_pad_value_and_dtype_conversion():
    tensor, mask = list_to_padded(col([[7], [8, 9]]), pad_value=-1, dtype=torch.long)
    assert tensor.dtype == torch.long
    assert tensor.tolist() == [[7, -1], [8, 9]]
    tensor, _ = list_to_padded(col([[7], [8, 9]]), pad_value=-1, left=True)
    assert tensor.tolist() == [[-1, 7], [8, 9]]
    assert mask.tolist() == [[True, False], [True, True]]


def test_float32_values_are_exact_and_keep_dtype():
    rows = [[0.5, -1.25, 3.0e-8], [], [float(np.float32(0.1))]]
    tensor, mask = list_to_padded(col(rows, F32), pad_value=float("nan"))
    assert tensor.dtype == torch.float32
    assert tensor[0].tolist() == [0.5, -1.25, float(np.float32(3.0e-8))]
    assert torch.isnan(tensor[1]).all()  # pad_value fills the empty row
    back = padded_to_list(tensor, mask)
    assert back.type == F32
    assert back.to_pylist() == col(rows, F32).to_pylist()


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize(
    "rows",
    [
        [[1, 2, 3], [], [4], [5, 6], []],
        [[], [], [7, 8], []],  # all rows empty but one
        [[], [-(2**31), 2**31 - 1], []],  # int32 extremes survive
        [[1, 2], [3, 4]],  # no padding at all
    ],
)
def test_int32_round_trip_ragged(rows, left):
    column = col(rows)
    tensor, mask = list_to_padded(column, left=left)
    assert tensor.dtype == torch.int32
    assert mask.sum(dim=1).tolist() == [len(r) for r in rows]
    back = padded_to_list(tensor, mask)
    assert back.type == I32
    assert back.to_pylist() == rows


def test_float32_round_trip_left():
    rows = [[], [0.25], [1.5, -2.0, 3.75]]
    tensor, mask = list_to_padded(col(rows, F32), left=True)
    assert tensor.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.25], [1.5, -2.0, 3.75]]
    assert padded_to_list(tensor, mask).to_pylist() == rows


def test_empty_batch():
    tensor, mask = list_to_padded(col([]))
    assert tuple(tensor.shape) == (0, 0)
    assert tuple(mask.shape) == (0, 0)
    assert padded_to_list(tensor, mask, value_type=pa.int32()).to_pylist() == []


@pytest.mark.parametrize("rows", [[[5]], [[], [5], []]])
def test_left_padding_width_one(rows):
    tensor, mask = list_to_padded(col(rows), left=True)
    assert tensor.tolist() == [r or [0] for r in rows]
    assert mask.tolist() == [[bool(r)] for r in rows]


def test_all_empty_int_column_keeps_int_dtype():
    tensor, mask = list_to_padded(col([[], []]))
    assert tuple(tensor.shape) == (2, 0)
    assert tensor.dtype == torch.int32
    assert padded_to_list(tensor, mask).type == I32


# --- Arrow input forms ------------------------------------------------------------------------


def test_chunked_array_input():
    chunked = pa.chunked_array([col([[1, 2]]), col([[3], []]), col([[4, 5, 6]])])
    tensor, mask = list_to_padded(chunked)
    assert tensor.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0], [4, 5, 6]]
    assert mask.sum(dim=1).tolist() == [2, 1, 0, 3]
    assert list_lengths(chunked).tolist() == [2, 1, 0, 3]
    assert padded_to_list(tensor, mask).to_pylist() == chunked.to_pylist()


@pytest.mark.parametrize("left", [False, True])
def test_sliced_array_with_nonzero_offset(left):
    base = col([[9, 9, 9], [1, 2], [], [3, 4, 5], [8]])
    sliced = base.slice(1, 3)
    assert sliced.offset == 1  # the case under test: offsets do not start at 0
    tensor, mask = list_to_padded(sliced, left=left)
    if left:
        assert tensor.tolist() == [[0, 1, 2], [0, 0, 0], [3, 4, 5]]
    else:
        assert tensor.tolist() == [[1, 2, 0], [0, 0, 0], [3, 4, 5]]
    assert mask.sum(dim=1).tolist() == [2, 0, 3]
    assert list_lengths(sliced).tolist() == [2, 0, 3]
    assert padded_to_list(tensor, mask).to_pylist() == [[1, 2], [], [3, 4, 5]]


def test_slice_of_chunked_table_column():
    table = pa.table({"ids": col([[1], [2, 3], [4, 5, 6], [7]])}).slice(2, 2)
    tensor, _ = list_to_padded(table.column("ids"))
    assert tensor.tolist() == [[4, 5, 6], [7, 0, 0]]


def test_large_list_input():
    tensor, mask = list_to_padded(pa.array([[1, 2], [3]], type=pa.large_list(pa.int32())))
    assert tensor.tolist() == [[1, 2], [3, 0]]
    assert mask.tolist() == [[True, True], [True, False]]


# --- errors -----------------------------------------------------------------------------------


def test_non_list_column_is_rejected():
    with pytest.raises(TypeError, match="expected a list column, got int64"):
        list_to_padded(pa.array([1, 2, 3]))
    with pytest.raises(TypeError, match="expected a list column"):
        list_to_padded(pa.chunked_array([pa.array(["a"])]))


def test_null_rows_are_rejected():
    with pytest.raises(ValueError, match="1 null rows"):
        list_to_padded(col([[1], None, [2, 3]]))
    with pytest.raises(ValueError, match="2 null rows"):
        list_to_padded(pa.chunked_array([col([None]), col([[1], None])]))


def test_padded_to_list_shape_mismatch():
    with pytest.raises(ValueError, match=r"tensor shape \(2, 3\) != mask shape \(2, 2\)"):
        padded_to_list(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


# --- the small helpers ------------------------------------------------------------------------


def test_padded_to_list_explicit_value_type_and_int64():
    tensor = torch.tensor([[5, 6, 0], [7, 0, 0]], dtype=torch.int64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # non-bool masks are accepted
    assert padded_to_list(tensor, mask).type == pa.list_(pa.int64())
    out = padded_to_list(tensor, mask, value_type=pa.int32())
    assert out.type == I32
    assert out.to_pylist() == [[5, 6], [7]]


def test_padded_to_list_keeps_masked_items_anywhere():
    tensor = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    assert padded_to_list(tensor, mask).to_pylist() == [[2.0, 3.0], [4.0]]


def test_padded_to_list_detaches_grad_tensors():
    tensor = torch.tensor([[1.0, 2.0]], requires_grad=True) * 2
    out = padded_to_list(tensor, torch.tensor([[True, False]]))
    assert out.to_pylist() == [[2.0]]


def test_sequences_to_list_types():
    ints = sequences_to_list([[1, 2], [], [3]])
    assert ints.type == I32
    assert ints.to_pylist() == [[1, 2], [], [3]]
    floats = sequences_to_list([(0.5,), [-1.5, 2.0]], pa.float32())
    assert floats.type == F32
    assert floats.to_pylist() == [[0.5], [-1.5, 2.0]]


def test_list_lengths():
    lengths = list_lengths(col([[1, 2, 3], [], [4]]))
    assert isinstance(lengths, np.ndarray)
    assert lengths.tolist() == [3, 0, 1]
    assert list_lengths(col([])).tolist() == []


# --- property: round trip over random ragged int lists ----------------------------------------

ragged_ints = st.lists(
    st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=7),
    min_size=1,
    max_size=9,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=ragged_ints, left=st.booleans(), start=st.integers(0, 2))
def test_round_trip_property(rows, left, start):
    width = max(len(r) for r in rows)
    column = col([[0]] * start + rows).slice(start)  # exercise non-zero offsets too
    tensor, mask = list_to_padded(column, left=left)
    assert tuple(tensor.shape) == (len(rows), width)
    assert mask.sum(dim=1).tolist() == [len(r) for r in rows]
    for i, row in enumerate(rows):
        real = tensor[i][mask[i]].tolist()
        assert real == row
        pad = tensor[i][~mask[i]]
        assert (pad == 0).all()
        # Real items are contiguous at the end (left) or the start (right) of the row.
        expected_mask = [False] * (width - len(row)) + [True] * len(row)
        if not left:
            expected_mask = expected_mask[::-1]
        assert mask[i].tolist() == expected_mask
    back = padded_to_list(tensor, mask, value_type=pa.int32())
    assert back.to_pylist() == rows
    assert list_lengths(column).tolist() == [len(r) for r in rows]
