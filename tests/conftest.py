"""Shared fixtures: one real Dask LocalCluster (worker processes, localhost) per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dask_client():
    from asyncflow.runtime.cluster import ClusterConfig, connect

    with connect(ClusterConfig(n_workers=2, dashboard_address="127.0.0.1:0")) as client:
        yield client
