"""A second Dask client in the process (another cluster, a notebook's) must not capture
the replicas: distributed binds deserialized actor handles to the *newest* client."""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

from asyncflow.runtime.executor import SyncExecutor
from asyncflow.runtime.report import read_metrics
from asyncflow.workflows import grpo

pytestmark = pytest.mark.cluster

TINY = grpo.GRPOConfig(steps=1, prompts_per_step=4, group_size=2, warmstart_steps=5)


@pytest.mark.timeout(180)
def test_a_newer_client_in_the_process_does_not_capture_the_replicas(dask_client, tmp_path):
    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=None) as other,
        Client(other) as newer,
    ):
        assert Client.current() is newer  # the default client is now the other cluster's
        SyncExecutor(grpo.recipe(TINY, tmp_path), dask_client, tmp_path).run()
    assert [m["step"] for m in read_metrics(tmp_path)] == [0]
