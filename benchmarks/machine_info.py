"""What every benchmark result says about where it was measured: date, machine, load,
versions, commit. One place, so every JSON and every figure caption agree."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except OSError:
        return ""


def describe(*packages: str) -> dict[str, Any]:
    """The machine now, plus the versions of `packages` (e.g. "torch", "dask")."""
    versions = {name: importlib.import_module(name).__version__ for name in packages}
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "memory_gib": memory_gib(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "asyncflow_commit": commit(),
    }


def one_line() -> str:
    python = platform.python_version()
    return f"{os.cpu_count()} cores ({cpu_model()}), {memory_gib()} GiB, Python {python}"
