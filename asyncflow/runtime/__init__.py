"""The Dask side of asyncflow: queue, executor, weight sync, checkpoints, metrics."""
