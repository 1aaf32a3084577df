"""Where a run record lives on disk, and the small helpers every reader and writer shares.

    RUN_DIR/record/
      manifest.json                 the run: workflow (+ hash), operator versions, config,
                                    recipe, seeds, library versions, cap; one segment per
                                    (re)start
      events.jsonl                  run-wide events, in order: trainer states saved (step,
                                    version, weights digest), weights published / loaded,
                                    recoveries, evictions, the end of the run
      steps/000003/
        source.arrow                the step's source rows with `sample_id` (Arrow IPC stream)
        <operator>.arrow            one record batch per micro-batch the operator finished:
                                    `sample_id` (the micro-batch's rows, in order) + every
                                    column it put into the TransferQueue
        events.jsonl                the step's events: rows added, each dispatch (operator,
                                    replica, worker, file + batch index, attempt, weight
                                    version, times, input columns and their digest), each
                                    trainer's end_step metrics, and last the step's metrics
                                    record ("step_finished": the step is complete)
      states/<trainer>/step-000003.safetensors
                                    the trainer's full state after step 3 (weights `model.*`
                                    and AdamW moments `optim.*`; its version and meta as JSON
                                    in the safetensors metadata)

Only Arrow IPC, JSON and safetensors: reading a record never unpickles anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

FORMAT = "asyncflow-record/1"
RECORD_DIR = "record"
MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
STEPS = "steps"
STATES = "states"
SOURCE = "source"  # file stem of a step's source rows
STATE_META = "asyncflow_state"  # safetensors metadata key of a state's JSON facts
SAMPLE_ID = "sample_id"
DEFAULT_CAP = "2GB"

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}
_UNITS |= {"T": 1e12, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'2GB', '500MB', '1.5GiB', 1000000 -> bytes; 'none'/'unlimited' -> None (no cap)."""
    if text is None or isinstance(text, int):
        return text
    raw = str(text).strip()
    if raw.lower() in ("none", "unlimited", "inf", "off"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", raw)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(
            f"record cap {text!r}: expected a size such as 2GB, 500MB, 1.5GiB, or 'none'"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"record cap {text!r} must be positive (or 'none' for no cap)")
    return size


def format_size(n: float | None) -> str:
    if n is None:
        return "no cap"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def record_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD_DIR


def step_dir(root: Path, step: int) -> Path:
    return root / STEPS / f"{step:06d}"


def state_path(root: Path, trainer: str, step: int) -> Path:
    """A trainer's state after `step` (-1: before training): tensors, and its facts
    (version, step, meta) as JSON in the safetensors metadata."""
    return root / STATES / safe_name(trainer) / f"step-{step:06d}.safetensors"


def state_facts(path: Path) -> dict[str, Any]:
    """The JSON facts in a state file's header ({} when unreadable): no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(STATE_META, "{}"))
    except Exception:  # safetensors raises its own error types
        return {}


def parse_state_step(path: Path) -> int | None:
    match = re.fullmatch(r"step-(-?[0-9]+)", path.stem)
    return int(match.group(1)) if match else None


def safe_name(name: str) -> str:
    """An operator name usable as a file name (the events keep the real name)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if cleaned != name:
        cleaned += "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
    return cleaned


def json_dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_jsonable, **kwargs)


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (np.ndarray, tuple, set)):
        return list(value.tolist() if isinstance(value, np.ndarray) else value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temporary name, then rename: a crash never leaves half a JSON file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json_dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def workflow_hash(description: dict) -> str:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def weights_digest(tensors: dict[str, Any], prefix: str = "model.") -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes), in name order.

    Takes a state (`model.*` keys) or plain weights (prefix=""); the same weights give
    the same digest whichever way they are held.
    """
    return _digest(_byte_views(tensors), prefix)


def save_state(path: Path, tensors: dict[str, Any], facts: dict[str, Any]) -> tuple[str, int]:
    """Write tensors (and `facts` as JSON in the metadata) as a safetensors file, readable
    by `safetensors.torch.load_file`; returns (digest of the `model.*` weights, bytes).

    The format is an 8-byte little-endian header length, a JSON header (names, dtypes,
    shapes, byte ranges, `__metadata__`), then the bytes, written here in one pass from
    the tensors' memory, without the per-tensor copies of `save_file`.
    """
    views = _byte_views(tensors)
    metadata = {STATE_META: json_dumps(facts, sort_keys=True)}
    dtypes = _safetensors_dtypes()
    if any(v[0].dtype not in dtypes for v in views.values()):
        from safetensors.torch import save_file  # an unusual dtype: the library's writer

        save_file({k: v[0] for k, v in views.items()}, str(path), metadata=metadata)
        return _digest(views, "model."), path.stat().st_size
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (tensor, data) in views.items():
        header[name] = {
            "dtype": dtypes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.writelines(memoryview(data) for _, data in views.values())
    return _digest(views, "model."), 8 + len(text) + offset


def _byte_views(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (contiguous CPU tensor, its bytes as a uint8 numpy view), in name order."""
    import torch

    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        out[name] = (t, t.reshape(-1).view(torch.uint8).numpy())
    return out


def _digest(views: dict[str, tuple[Any, Any]], prefix: str) -> str:
    h = hashlib.sha256()
    for name, (t, data) in views.items():
        if name.startswith(prefix):
            h.update(f"{name[len(prefix) :]}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(memoryview(data))
    return "sha256:" + h.hexdigest()


@functools.cache
def _safetensors_dtypes() -> dict[Any, str]:
    """torch dtype -> its safetensors name (torch is imported only when states are saved)."""
    import torch

    names = {
        "float64": "F64",
        "float32": "F32",
        "float16": "F16",
        "bfloat16": "BF16",
        "int64": "I64",
        "int32": "I32",
        "int16": "I16",
        "int8": "I8",
        "uint8": "U8",
        "bool": "BOOL",
    }
    return {getattr(torch, k): v for k, v in names.items()}


def batch_digest(batch: pa.RecordBatch) -> str:
    """A digest of a record batch's column names, types and values, whatever its memory
    layout: a slice of a bigger chunk and a freshly built copy of the same rows digest
    alike. Hashes the values in place (no copy for numeric data)."""
    h = hashlib.sha256()
    for field, column in zip(batch.schema, batch.columns, strict=True):
        h.update(f"{field.name}|{field.type}|{len(column)}|".encode())
        _hash_values(h, column)
    return "sha256:" + h.hexdigest()


def _hash_values(h: Any, a: pa.Array) -> None:
    import numpy as np

    t = a.type
    if a.null_count:  # values under nulls are undefined: hash the logical values
        h.update(repr(a.to_pylist()).encode())
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = a.offsets.to_numpy()  # absolute positions in the (unsliced) child
        h.update(memoryview(np.diff(offsets)))
        start, end = int(offsets[0]), int(offsets[-1])
        _hash_values(h, a.values.slice(start, end - start))
    elif pa.types.is_fixed_size_list(t):
        _hash_values(h, a.flatten())
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        h.update(memoryview(np.ascontiguousarray(a.to_numpy(zero_copy_only=False))))
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        values = a.to_pylist()
        h.update(memoryview(np.array([len(v) for v in values], np.int64)))
        h.update("".join(values).encode())
    else:
        h.update(repr(a.to_pylist()).encode())
