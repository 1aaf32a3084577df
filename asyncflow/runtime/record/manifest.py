"""The manifest: what a run was, fixed at its start, so a replay can rebuild and check it.

Workflow definition and its hash, every operator's class and a hash of its source code
(the operator's "version"), the workflow config, the recipe's numbers, the seeds and how
each is derived, the mode, and library versions. A resumed run appends a segment.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

from asyncflow.runtime.record import layout

if TYPE_CHECKING:
    from asyncflow.runtime.events import RunInfo

SEEDING = {
    "replica": "OperatorContext.seed = run_seed * 1000 + replica (model init, operator RNGs)",
    "generation": "per row: SplitMix64 stream keyed by blake2b(f'{run_seed}:{sample_id}')",
    "source": "the source operator's own, from (its seed, step)",
}


def build_manifest(
    info: RunInfo, cap_bytes: int | None, cap_text: str | None, verify_inputs: bool
) -> dict[str, Any]:
    description = info.graph.describe()
    recipe = info.recipe
    sync_source = {target: source for source, target in info.graph.weight_syncs}
    operators = {}
    for name in info.graph.order():
        node = info.graph.nodes[name]
        op = node.operator
        operators[name] = {
            "class": f"{type(op).__module__}:{type(op).__qualname__}",
            "code_sha256": operator_code_hash(op),
            "replicas": node.replicas,
            "resources": dict(node.resources),
            "has_weights": bool(node.has_weights),
            "trains": bool(getattr(op, "trains", False)) and bool(node.has_weights),
            "is_source": bool(node.is_source),
            "weights_from": sync_source.get(name),
            "prepared": name in recipe.prepare_targets and recipe.prepare is not None,
            "seeds": [recipe.seed * 1000 + r for r in range(node.replicas)],
            "file": layout.safe_name(name),
        }
    return {
        "format": layout.FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "workflow_name": info.workflow_name,
        "workflow": description,
        "workflow_hash": layout.workflow_hash(description),
        "operators": operators,
        "config": info.config,
        "recipe": {
            "steps": recipe.steps,
            "rows_per_step": recipe.rows_per_step,
            "micro_batch_size": recipe.micro_batch_size,
            "seed": recipe.seed,
            "trainer": recipe.trainer,
            "metric_columns": list(recipe.metric_columns),
            "prepare_targets": list(recipe.prepare_targets),
            "prepared": recipe.prepare is not None,
        },
        "seeds": {"run_seed": recipe.seed, **SEEDING},
        "cap_bytes": cap_bytes,
        "cap": cap_text,
        "verify_inputs": verify_inputs,
        "versions": library_versions(),
        "segments": [
            {
                "first_step": info.first_step,
                "mode": info.mode,
                "max_staleness": info.max_staleness,
                "scheduler": info.scheduler,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        ],
    }


def operator_code_hash(operator: Any) -> str | None:
    """sha256 of the source files defining the operator's class and its asyncflow bases:
    it changes when the code that computes the columns may have."""
    h = hashlib.sha256()
    try:
        for cls in type(operator).__mro__:
            if cls is type(operator) or cls.__module__.startswith("asyncflow."):
                h.update(_file_bytes(inspect.getsourcefile(cls) or ""))
    except (OSError, TypeError):
        return None
    return "sha256:" + h.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for module in ("asyncflow", "torch", "pyarrow", "numpy"):
        try:
            from importlib.metadata import version

            versions[module] = version(module)
        except Exception:
            mod = sys.modules.get(module)
            versions[module] = getattr(mod, "__version__", "?") if mod else "?"
    return versions
