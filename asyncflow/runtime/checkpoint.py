"""Checkpoints: every replica's exact state as safetensors + JSON, never pickle.

A checkpoint is a directory `checkpoints/step-NNNNNN/` holding one `<operator>-<replica>`
pair of files per stateful replica (`.safetensors` tensors: weights, optimizer moments;
`.json`: versions, param groups, schedule) and a `manifest.json` with the step and the
run's position (next sample id, evaluation so far). It is written to a temporary name
and renamed, so a crash mid-save never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from asyncflow.errors import ConfigError

State = tuple[dict[str, torch.Tensor], dict[str, Any]]


def save_checkpoint(
    run_dir: Path, step: int, states: dict[str, State], manifest: dict[str, Any]
) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key, (tensors, meta) in states.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{key}.safetensors"))
        (tmp / f"{key}.json").write_text(json.dumps(meta, sort_keys=True))
    (tmp / "manifest.json").write_text(
        json.dumps({**manifest, "step": step, "states": sorted(states)}, indent=2)
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "manifest.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, State]]:
    from safetensors.torch import load_file

    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise ConfigError(f"{path}: not a checkpoint (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    states = {}
    for key in manifest["states"]:
        try:
            tensors = load_file(str(path / f"{key}.safetensors"))
            meta = json.loads((path / f"{key}.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: state {key!r} is unreadable: {exc}") from exc
        states[key] = (tensors, meta)
    return manifest, states
