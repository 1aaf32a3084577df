"""`--scheduler tcp://...`: a run on a cluster someone else started (dask scheduler + workers)."""

from __future__ import annotations

import subprocess
import sys

import dask_processes
import pytest
from distributed import Client

from asyncflow.runtime.queue.extension import EXTENSION
from asyncflow.runtime.queue.remote import DistributedTransferQueue

pytestmark = pytest.mark.cluster

DASK = dask_processes.DASK


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    if DASK is None:
        pytest.skip("the `dask` command is not on PATH")
    directory = tmp_path_factory.mktemp("cluster")
    with dask_processes.scheduler(directory, "asyncflow.runtime.queue.extension") as info:
        address = info["address"]
        with dask_processes.workers(address, 2):
            with Client(address) as client:
                client.wait_for_workers(2, timeout=60)
            yield address


def test_grpo_runs_on_an_existing_scheduler(external_cluster, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "asyncflow.cli",
        "run",
        "grpo",
        "--steps",
        "2",
        "--run-dir",
        str(run_dir),
        "--scheduler",
        external_cluster,
        "--set",
        "warmstart_steps=20",
        "--set",
        "prompts_per_step=8",
        "--set",
        "group_size=4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("held-out accuracy: ")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def _has_extension(dask_scheduler) -> bool:
    return EXTENSION in dask_scheduler.extensions


def test_preloaded_queue_extension_serves_clients(external_cluster):
    with Client(external_cluster) as client:
        assert client.run_on_scheduler(
            lambda dask_scheduler: EXTENSION in dask_scheduler.extensions
        )
        queue = DistributedTransferQueue(client=client)
        import pyarrow as pa

        ids = queue.add_rows(0, pa.record_batch({"x": pa.array([1, 2, 3])}))
        assert queue.gather(0, ["x"]).column("sample_id").to_pylist() == ids.tolist()
        queue.close()
