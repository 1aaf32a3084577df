"""How queue metadata crosses Dask comms: numpy arrays as raw bytes, Arrow types as a schema.

Dask messages are msgpack; sending ids and lengths as bytes keeps a 4k-row commit one
small frame instead of thousands of msgpack integers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from asyncflow.runtime.queue.controller import RowMeta


def pack(array: np.ndarray | None, dtype: type = np.int64) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype=dtype).tobytes()


def unpack(data: bytes | None, dtype: type = np.int64) -> np.ndarray | None:
    return None if data is None else np.frombuffer(data, dtype=dtype).copy()


def pack_types(types: dict[str, pa.DataType]) -> bytes:
    return pa.schema([pa.field(n, t) for n, t in types.items()]).serialize().to_pybytes()


def unpack_types(data: bytes) -> dict[str, pa.DataType]:
    schema = pa.ipc.read_schema(pa.py_buffer(data))
    return {field.name: field.type for field in schema}


def pack_meta(meta: RowMeta) -> dict:
    return {
        "group_ids": pack(meta.group_ids),
        "grouped": pack(meta.grouped, np.bool_),
        "policy_versions": pack(meta.policy_versions),
        "lengths": pack(meta.lengths),
    }


def unpack_meta(data: dict) -> RowMeta:
    return RowMeta(
        group_ids=unpack(data["group_ids"]),
        grouped=unpack(data["grouped"], np.bool_),
        policy_versions=unpack(data["policy_versions"]),
        lengths=unpack(data["lengths"]),
    )
