"""Getting a Dask client: our embedded LocalCluster, or any cluster the user already runs.

We never manage machines ourselves: SLURM (dask-jobqueue), Kubernetes
(dask-kubernetes) or a hand-started `dask scheduler` all hand us an address.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from distributed import Client, LocalCluster


@dataclass(frozen=True)
class ClusterConfig:
    scheduler: str | None = None  # tcp://host:port of an existing cluster; None = embedded
    n_workers: int = 2
    threads_per_worker: int = 1
    host: str = "127.0.0.1"  # embedded scheduler and workers bind here (localhost by default)
    dashboard_address: str = "127.0.0.1:8787"  # another free port is picked if taken
    memory_limit: str = "auto"


@contextlib.contextmanager
def connect(config: ClusterConfig = ClusterConfig()) -> Iterator[Client]:
    """Yield a client to the configured cluster; an embedded one is torn down afterwards."""
    if config.scheduler is not None:
        with Client(config.scheduler) as client:
            yield client
        return
    # A busy default dashboard port is not worth a warning: Dask picks another one.
    logging.getLogger("distributed.node").setLevel(logging.ERROR)
    with (
        LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            processes=True,
            host=config.host,
            dashboard_address=config.dashboard_address,
            memory_limit=config.memory_limit,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def dashboard_url(client: Client) -> str | None:
    return client.dashboard_link if client.scheduler_info().get("services") else None


def worker_addresses(client: Client) -> list[str]:
    return sorted(client.scheduler_info(n_workers=-1)["workers"])
