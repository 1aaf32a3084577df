"""Shared fixtures: one real Dask LocalCluster (worker processes, localhost) per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and do not stall on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def dask_client():
    from asyncflow.runtime.cluster import ClusterConfig, connect

    with connect(ClusterConfig(n_workers=2, dashboard_address="127.0.0.1:0")) as client:
        yield client
