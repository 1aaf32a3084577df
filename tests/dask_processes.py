"""Separately started `dask scheduler` / `dask worker` processes, as a user would run them
(tests of `--scheduler tcp://...` and of `--preload` modules)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DASK = shutil.which("dask")
_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [DASK, *args], env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def scheduler(directory: Path, preload: str, dashboard: bool = False) -> Iterator[dict]:
    """A scheduler on 127.0.0.1 with `preload`; yields its scheduler file's contents
    (`address`, and `services["dashboard"]`, the dashboard port, with `dashboard`)."""
    scheduler_file = directory / "scheduler.json"
    web = ["--dashboard-address", "127.0.0.1:0"] if dashboard else ["--no-dashboard"]
    procs = [
        _start(
            "scheduler", "--host", "127.0.0.1", "--port", "0", *web,
            "--scheduler-file", str(scheduler_file), "--preload", preload,
        )
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield json.loads(scheduler_file.read_text())
    finally:
        _stop(procs)


@contextmanager
def workers(address: str, n: int) -> Iterator[None]:
    """`n` single-threaded workers of the scheduler at `address` (not waited for)."""
    procs = [
        _start("worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard")
        for _ in range(n)
    ]
    try:
        yield
    finally:
        _stop(procs)
