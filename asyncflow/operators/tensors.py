"""Arrow list columns <-> padded torch tensors.

Storage keeps token sequences ragged (no padding bytes in the queue); models
want rectangles. These helpers are the only place the two meet, so padding side
and dtype rules live in one spot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

_TORCH_TO_ARROW = {
    torch.int32: pa.int32(),
    torch.int64: pa.int64(),
    torch.float32: pa.float32(),
    torch.float64: pa.float64(),
    torch.bool: pa.bool_(),
}


def list_to_padded(
    column: pa.Array | pa.ChunkedArray,
    *,
    pad_value: float = 0,
    dtype: torch.dtype | None = None,
    left: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A list<T> column as a (B, T_max) tensor and its (B, T_max) bool mask of real items.

    `left=True` pads on the left, the layout batched generation needs.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise TypeError(f"expected a list column, got {column.type}")
    if column.null_count:
        raise ValueError(f"list column has {column.null_count} null rows")
    offsets = column.offsets.to_numpy(zero_copy_only=False)
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    values = column.flatten().to_numpy(zero_copy_only=False)
    batch, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    # the dtype comes from the column type, so an all-empty column keeps it too
    out = np.full((batch, width), pad_value, dtype=column.type.value_type.to_pandas_dtype())
    mask = np.arange(width)[None, :] < lengths[:, None]  # (B, T)
    if left:
        mask = mask[:, ::-1].copy()  # a real copy: torch rejects negative strides
    out[mask] = values
    tensor = torch.from_numpy(out)
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor, torch.from_numpy(mask)


def padded_to_list(
    tensor: torch.Tensor, mask: torch.Tensor, *, value_type: pa.DataType | None = None
) -> pa.ListArray:
    """Inverse of `list_to_padded`: keep the items where `mask` is true, row by row."""
    if tensor.shape != mask.shape:
        raise ValueError(f"tensor shape {tuple(tensor.shape)} != mask shape {tuple(mask.shape)}")
    mask_np = mask.detach().cpu().numpy().astype(bool)
    values = tensor.detach().cpu().numpy()[mask_np]
    lengths = mask_np.sum(axis=1)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    value_type = value_type or _TORCH_TO_ARROW[tensor.dtype]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def sequences_to_list(
    seqs: Sequence[Sequence[float]], value_type: pa.DataType | None = None
) -> pa.ListArray:
    """Python lists (ragged) as an Arrow list column; int32 tokens unless told otherwise."""
    return pa.array([list(s) for s in seqs], type=pa.list_(value_type or pa.int32()))


def list_lengths(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy(zero_copy_only=False)
    return np.diff(offsets)
