"""Run records: every run written down, so any operator can be re-run on what it saw.

One module per job:

- `layout.py`: where everything lives on disk (Arrow IPC, JSON, safetensors: no pickle),
  sizes, digests.
- `manifest.py`: what the run was (workflow and hash, operator versions, config, seeds).
- `recorder.py`: `Recorder`, the run observer (cheap hooks, a background writer thread).
- `writer.py`: the files, and the size cap (oldest finished steps dropped first).
- `reader.py`: `RunRecord`, reading a record; `RecordError` names a damaged file.
- `diff.py`: column-by-column comparison (exact integers, float tolerance).
- `replay.py`: `Replayer`, re-running operators in-process on their recorded inputs.
- `inspection.py`: listing a record, one sample's lineage, export of a step to Parquet.
- `commands.py`: `asyncflow replay` and `asyncflow inspect`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RecordError", "Recorder", "Replayer", "RunRecord", "Tolerance"]


def __getattr__(name: str) -> Any:  # lazy: importing the package stays cheap
    if name == "Recorder":
        from asyncflow.runtime.record.recorder import Recorder

        return Recorder
    if name in ("RunRecord", "RecordError"):
        from asyncflow.runtime.record import reader

        return getattr(reader, name)
    if name == "Replayer":
        from asyncflow.runtime.record.replay import Replayer

        return Replayer
    if name == "Tolerance":
        from asyncflow.runtime.record.diff import Tolerance

        return Tolerance
    raise AttributeError(name)
