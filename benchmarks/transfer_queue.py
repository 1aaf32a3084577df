"""TransferQueue benchmark: data plane (put/get GiB/s) and control plane (dispatch latency, rate).

    python benchmarks/transfer_queue.py [--quick] [--json OUT]

Everything compared is measured in this run, on this machine:

1. Data plane at the public `transferqueue` package's perftest sizes ("small": rows x 9 fields
   of 8192 fp32 per row as `list<float32>`; "complex": ragged token/logprob columns, a string
   and scalars). In-process `TransferQueue` and cross-process `DistributedTransferQueue`
   (put inside a task on worker A, get inside a task on worker B, both timed in the task),
   next to two ceilings measured here too: memcpy and raw TCP loopback between two processes.
2. Control plane: latency of get(64 rows)+ack from a worker task, and dispatches/s with 1, 8
   and 64 concurrent consumers each looping get(1 row)+ack until the partition is drained;
   every run asserts that no row was delivered twice or lost.
3. The `transferqueue` package itself, only if it is installed (it is not a dependency).

`--quick` scales the row counts down (< 2 minutes); the full run takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from distributed import Client, LocalCluster, get_client
from distributed.protocol import serialize
from machine_info import describe

from asyncflow.runtime.queue import TransferQueue
from asyncflow.runtime.queue.remote import DistributedTransferQueue

GIB = 1 << 30
MIB = 1 << 20
FIELDS = 9  # the perftest's "small" case: 9 fields ...
WIDTH = 8192  # ... of 8192 fp32 values per row
MICRO_ROWS = 64  # micro-batch size for per-lease overhead and dispatch latency
LATENCY_ROWS = 8192  # partition size for dispatch latency (one GRPO step: 1024 prompts x 8)
TCP_CHUNK = 8 * MIB
TRANSFERQUEUE_SKIPPED = (
    "transferqueue not installed: comparison skipped (pip install transferqueue==0.1.11 "
    "to include it, or set $ASYNCFLOW_TQ_PYTHON to an interpreter that has it)"
)


@dataclass(frozen=True)
class Settings:
    rows: int  # rows of the small and complex data sets
    inproc_reps: int  # repetitions of in-process put/get
    remote_reps: int  # repetitions of cross-process get (after one warm-up)
    put_reps: int  # repetitions of cross-process put
    ceiling_reps: int  # repetitions of memcpy / TCP (after one warm-up)
    latency_pairs: int  # sequential get+ack pairs for the latency percentiles
    dispatch_rows: int  # rows drained by each concurrency level
    dispatch_reps: int  # drains per concurrency level (best and median reported)
    scaling_rows: tuple[int, ...]  # partition sizes for the control-plane scaling check


QUICK = Settings(256, 10, 5, 3, 3, 300, 2048, 2, (1_000, 16_000, 131_072))
FULL = Settings(1024, 30, 9, 5, 5, 1000, 4096, 3, (1_000, 16_000, 131_072))


# ---- results --------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    size: str = ""
    time: str = ""
    result: str = ""
    note: str = ""


@dataclass
class Report:
    rows: list[Row | str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[tuple[str, str, str]] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.rows.append(title)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  .. {row.name}: {row.time} {row.result} {row.note}".rstrip(), flush=True)

    def target(self, what: str, value: str, ok: bool, fail_word: str = "MISS") -> None:
        self.targets.append((what, value, "PASS" if ok else fail_word))

    def render(self) -> str:
        header = Row("measurement", "size", "time", "result", "note")
        cells = [r for r in self.rows if isinstance(r, Row)]
        widths = [
            max(len(getattr(r, f)) for r in [header, *cells])
            for f in ("name", "size", "time", "result")
        ]

        def line(r: Row) -> str:
            parts = [r.name, r.size, r.time, r.result]
            text = " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True))
            return f"{text} | {r.note}".rstrip(" |")

        total = sum(widths) + 3 * len(widths) + 40
        out = [
            "time and result: best / median of the repetitions (p50 / p99 where the name says)",
            "",
            line(header),
            "-" * total,
        ]
        for r in self.rows:
            out.append(f"[{r}]" if isinstance(r, str) else line(r))
        out += ["", "targets", "-" * total]
        tw = max(len(t[0]) for t in self.targets) if self.targets else 0
        vw = max(len(t[1]) for t in self.targets) if self.targets else 0
        out += [
            f"{what.ljust(tw)} | {value.ljust(vw)} | {verdict}"
            for what, value, verdict in self.targets
        ]
        return "\n".join(out)


def gibs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GIB if seconds > 0 else float("inf")


def size_str(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.2f} s"


def rate_str(value: float) -> str:
    return f"{value:.0f} GiB/s" if value >= 100 else f"{value:.2f} GiB/s"


def summary(times: Sequence[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def throughput_row(
    report: Report, key: str, name: str, nbytes: int, times: Sequence[float], note: str = ""
) -> tuple[float, float]:
    """One data-plane row; returns (best, median) GiB/s and records them with the times."""
    best_t, med_t = summary(times)
    best, med = gibs(nbytes, best_t), gibs(nbytes, med_t)
    report.figures.update(
        {
            f"{key}_bytes": nbytes,
            f"{key}_s_best": best_t,
            f"{key}_s_median": med_t,
            f"{key}_gibs_best": best,
            f"{key}_gibs_median": med,
            f"{key}_reps": len(times),
        }
    )
    report.add(
        Row(
            name,
            size_str(nbytes),
            f"{ms(best_t)} / {ms(med_t)}",
            f"{rate_str(best)} / {rate_str(med)}",
            note,
        )
    )
    return best, med


def percentiles(values: Sequence[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return float(p50), float(p99)


# ---- data -----------------------------------------------------------------------------------


def make_small(rows: int, seed: int = 0, fixed: bool = False) -> pa.RecordBatch:
    """rows x 9 fields, each a per-row vector of 8192 fp32 (the perftest's "small" case)."""
    rng = np.random.default_rng(seed)
    offsets = pa.array(np.arange(0, rows * WIDTH + 1, WIDTH, dtype=np.int32))
    columns = {}
    for f in range(FIELDS):
        values = pa.array(rng.random(rows * WIDTH, dtype=np.float32))
        if fixed:
            columns[f"f{f}"] = pa.FixedSizeListArray.from_arrays(values, WIDTH)
        else:
            columns[f"f{f}"] = pa.ListArray.from_arrays(offsets, values)
    return pa.record_batch(columns)


def make_complex(rows: int, seed: int = 1) -> pa.RecordBatch:
    """An RL batch: ragged prompt/response tokens (lognormal lengths, mean ~2k), three ragged
    fp32 columns aligned with the response, a prompt string and scalar columns."""
    rng = np.random.default_rng(seed)
    sigma = 0.6
    mu = np.log(2048) - sigma**2 / 2  # lognormal with mean 2048

    def lengths(mean_mu: float) -> np.ndarray:
        return np.clip(rng.lognormal(mean_mu, sigma, rows), 16, 16384).astype(np.int64)

    def offsets(lens: np.ndarray) -> pa.Array:
        out = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(lens, out=out[1:])
        return pa.array(out)

    def ragged(lens: np.ndarray, values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets(lens), pa.array(values))

    plen, rlen = lengths(mu), lengths(mu)
    tlen = lengths(np.log(1024) - sigma**2 / 2)
    ntok = int(rlen.sum())
    text = rng.integers(97, 123, int(tlen.sum()), dtype=np.uint8)  # a-z
    return pa.record_batch(
        {
            "prompt_ids": ragged(plen, rng.integers(0, 50_000, int(plen.sum()), dtype=np.int32)),
            "response_ids": ragged(rlen, rng.integers(0, 50_000, ntok, dtype=np.int32)),
            "old_logprobs": ragged(rlen, -rng.random(ntok, dtype=np.float32)),
            "ref_logprobs": ragged(rlen, -rng.random(ntok, dtype=np.float32)),
            "advantages": ragged(rlen, rng.standard_normal(ntok, dtype=np.float32)),
            "prompt_text": pa.StringArray.from_buffers(
                rows, offsets(tlen).buffers()[1], pa.py_buffer(text)
            ),
            "group_id": pa.array(np.arange(rows) // 8, pa.int64()),
            "policy_version": pa.array(np.zeros(rows, dtype=np.int64)),
            "reward": pa.array(rng.random(rows, dtype=np.float32)),
            "response_length": pa.array(rlen),
        }
    )


SMALL_CHECK = "f0"  # column summed on arrival to prove the data is there
COMPLEX_CHECK = "response_ids"


def checksum(batch: pa.RecordBatch, column: str) -> float | int:
    """Sum of a list column's values: touches them, and is exact to compare across processes."""
    return pc.sum(batch.column(column).flatten()).as_py()


def int_rows(n: int, start: int = 0) -> pa.RecordBatch:
    return pa.record_batch({"x": pa.array(np.arange(start, start + n, dtype=np.int64))})


# ---- ceilings -------------------------------------------------------------------------------


def memcpy_ceiling(nbytes: int, reps: int) -> list[float]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        if i:  # the first copy is a warm-up
            times.append(time.perf_counter() - t0)
    return times


def _tcp_sender(port: int, nbytes: int, transfers: int) -> None:
    """Child process: on each go byte, send `nbytes` in large chunks."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = memoryview(np.ones(nbytes, dtype=np.uint8))
    for _ in range(transfers):
        if sock.recv(1) != b"g":
            break
        sent = 0
        while sent < nbytes:
            sent += sock.send(payload[sent : sent + TCP_CHUNK])
    sock.close()


def tcp_ceiling(nbytes: int, reps: int) -> tuple[list[float], list[float]]:
    """Raw TCP loopback between this process and a spawned child, plain sockets.

    Returns transfer times into (a reused receive buffer, a fresh buffer per transfer).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    transfers = 1 + 2 * reps
    child = mp.get_context("spawn").Process(
        target=_tcp_sender, args=(listener.getsockname()[1], nbytes, transfers), daemon=True
    )
    child.start()
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reused = np.empty(nbytes, dtype=np.uint8)

    def receive(buffer: np.ndarray) -> float:
        view = memoryview(buffer)
        t0 = time.perf_counter()
        conn.sendall(b"g")
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], min(TCP_CHUNK, nbytes - got))
            if n == 0:
                raise RuntimeError("TCP ceiling: sender closed early")
            got += n
        return time.perf_counter() - t0

    try:
        receive(reused)  # warm-up: connection, pages of the reused buffer
        warm = [receive(reused) for _ in range(reps)]
        fresh = [receive(np.empty(nbytes, dtype=np.uint8)) for _ in range(reps)]
    finally:
        conn.close()
        listener.close()
        child.join(timeout=30)
    return warm, fresh


def serialize_costs(batch: pa.RecordBatch, reps: int) -> tuple[list[float], list[float]]:
    """Sender-side cost of Dask's serializer for a RecordBatch vs pickle 5 out-of-band."""
    ipc, oob = [], []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        serialize(batch, serializers=("dask",))
        t1 = time.perf_counter()
        buffers: list[pickle.PickleBuffer] = []
        pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
        t2 = time.perf_counter()
        if i:
            ipc.append(t1 - t0)
            oob.append(t2 - t1)
    return ipc, oob


# ---- worker-side tasks (run inside Dask tasks; timed there) ---------------------------------


def task_make(kind: str, rows: int) -> pa.RecordBatch:
    if kind == "small":
        return make_small(rows)
    if kind == "small_fixed":
        return make_small(rows, fixed=True)
    return make_complex(rows)


def task_checksum(batch: pa.RecordBatch, column: str) -> float | int:
    return checksum(batch, column)


def task_put(queue: DistributedTransferQueue, partition: str, batch: pa.RecordBatch) -> dict:
    _ = queue.client  # bind the handle to this worker's client outside the timed region
    t0 = time.perf_counter()
    ids = queue.add_rows(partition, batch)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": len(ids), "ids": ids.tolist()}


def task_get(
    queue: DistributedTransferQueue, task: str, partition: str, columns: list[str], check: str
) -> dict:
    """One whole-partition lease; timed get, then touch the data and ack (untimed)."""
    _ = queue.client
    t0 = time.perf_counter()
    lease = queue.get(task, columns, partition, batch_size=None)
    seconds = time.perf_counter() - t0
    if lease is None:
        raise RuntimeError(f"get {task!r} on {partition!r} found nothing")
    batch = lease.batch
    out = {
        "seconds": seconds,
        "rows": batch.num_rows,
        "nbytes": batch.nbytes,
        "check": checksum(batch, check),
        "ids": lease.sample_ids.tolist(),
    }
    queue.ack(lease)
    return out


def task_get_micro(
    queue: DistributedTransferQueue, task: str, partition: str, columns: list[str], size: int
) -> dict:
    """Drain the partition in micro-batch leases; each get timed with its ack."""
    _ = queue.client
    times, ids, nbytes = [], [], 0
    while True:
        t0 = time.perf_counter()
        lease = queue.get(task, columns, partition, batch_size=size)
        if lease is None:
            break
        nbytes += lease.batch.nbytes
        queue.ack(lease)
        times.append(time.perf_counter() - t0)
        ids.extend(lease.sample_ids.tolist())
    return {"times": times, "ids": ids, "nbytes": nbytes}


def task_latency(
    queue: DistributedTransferQueue, partition: str, pairs: int, warmup: int, per_task: int
) -> dict:
    """Sequential get(64 rows) + ack pairs; returns the get and ack times (after warm-up).

    The partition holds `per_task` leases; every `per_task` leases a new task name starts
    over, so the partition size stays fixed however many pairs are timed."""
    _ = queue.client
    gets, acks, seen = [], [], {}
    for i in range(warmup + pairs):
        task = f"lat{i // per_task}"
        t0 = time.perf_counter()
        lease = queue.get(task, ["x"], partition, batch_size=MICRO_ROWS)
        t1 = time.perf_counter()
        if lease is None:
            raise RuntimeError(f"latency: partition {partition!r} ran dry after {i} leases")
        queue.ack(lease)
        t2 = time.perf_counter()
        seen.setdefault(task, []).extend(lease.sample_ids.tolist())
        if i >= warmup:
            gets.append(t1 - t0)
            acks.append(t2 - t1)
    duplicated = sum(len(ids) - len(set(ids)) for ids in seen.values())
    return {"get": gets, "ack": acks, "duplicated": duplicated}


def task_rpc_latency(n: int) -> list[float]:
    """The floor under every queue call: one plain scheduler round trip (echo)."""
    client = get_client()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.sync(client.scheduler.echo, data=b"")
        times.append(time.perf_counter() - t0)
    return times


async def task_consume_async(
    queue: DistributedTransferQueue, task: str, partition: str, consumers: int
) -> dict:
    """`consumers` coroutines on this worker's event loop, each get(1)+ack until drained."""
    return await _consume_async(queue, task, partition, consumers, ack_wait=True)


async def task_consume_async_piggyback(
    queue: DistributedTransferQueue, task: str, partition: str, consumers: int
) -> dict:
    """As task_consume_async, but acks are not awaited: they ride with the next get."""
    return await _consume_async(queue, task, partition, consumers, ack_wait=False)


async def _consume_async(
    queue: DistributedTransferQueue, task: str, partition: str, consumers: int, ack_wait: bool
) -> dict:
    _ = queue.client

    async def consumer() -> list[int]:
        mine = []
        while True:
            lease = await queue.get(task, ["x"], partition, batch_size=1)
            if lease is None:
                return mine
            if ack_wait:
                await queue.ack(lease)
            else:
                await queue.ack(lease, wait=False)
            mine.extend(lease.sample_ids.tolist())

    start = time.time()
    seen = await asyncio.gather(*(consumer() for _ in range(consumers)))
    return {"start": start, "end": time.time(), "ids": [i for ids in seen for i in ids]}


def task_consume_threads(
    queue: DistributedTransferQueue, task: str, partition: str, consumers: int
) -> dict:
    """`consumers` threads in this worker process, each a synchronous get(1)+ack loop."""
    _ = queue.client
    seen: list[list[int]] = [[] for _ in range(consumers)]
    errors: list[BaseException] = []

    def consumer(slot: int) -> None:
        try:
            while (lease := queue.get(task, ["x"], partition, batch_size=1)) is not None:
                queue.ack(lease)
                seen[slot].extend(lease.sample_ids.tolist())
        except BaseException as exc:
            errors.append(exc)

    # each thread runs in a copy of the task's context, so it knows which worker it is on
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(consumer, i))
        for i in range(consumers)
    ]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.time()
    if errors:
        raise errors[0]
    return {"start": start, "end": end, "ids": [i for ids in seen for i in ids]}


async def task_rpc_concurrent(consumers: int, calls: int) -> dict:
    """Plain scheduler round trips from `consumers` coroutines: the RPC ceiling, no queue."""
    client = get_client()

    async def one() -> None:
        for _ in range(calls):
            await client.scheduler.echo(data=b"")

    start = time.time()
    await asyncio.gather(*(one() for _ in range(consumers)))
    return {"start": start, "end": time.time(), "calls": consumers * calls}


# ---- benchmark sections ---------------------------------------------------------------------


def bench_ceilings(report: Report, s: Settings, batch: pa.RecordBatch) -> dict[str, float]:
    report.section("ceilings (same size as the small batch)")
    nbytes = batch.nbytes
    copy = memcpy_ceiling(nbytes, s.ceiling_reps)
    mem_best, _ = throughput_row(
        report, "memcpy", "memcpy (numpy copyto)", nbytes, copy, "one process, warm buffers"
    )
    warm, fresh = tcp_ceiling(nbytes, s.ceiling_reps)
    tcp_best, tcp_med = throughput_row(
        report,
        "tcp",
        "raw TCP loopback",
        nbytes,
        warm,
        "two processes, plain socket, reused receive buffer",
    )
    throughput_row(
        report,
        "tcp_fresh",
        "raw TCP loopback, fresh buffer",
        nbytes,
        fresh,
        "new receive buffer per transfer (page faults)",
    )
    # what a peer fetch pays before the bytes hit the socket, on the holder's side
    ipc, oob = serialize_costs(batch, s.ceiling_reps)
    throughput_row(
        report,
        "serialize_dask_arrow",
        "serialize small, Dask's Arrow serializer",
        nbytes,
        ipc,
        "what to_serialize(RecordBatch) runs: IPC stream into a growing buffer (a copy)",
    )
    throughput_row(
        report,
        "serialize_pickle5",
        "serialize small, pickle 5 out-of-band",
        nbytes,
        oob,
        "for contrast: buffers passed by reference, no copy",
    )
    return {"memcpy": mem_best, "tcp_best": tcp_best, "tcp_median": tcp_med}


def bench_in_process(
    report: Report, s: Settings, small: pa.RecordBatch, complex_: pa.RecordBatch
) -> None:
    report.section("in-process TransferQueue")
    for kind, batch, check in (("small", small, SMALL_CHECK), ("complex", complex_, COMPLEX_CHECK)):
        queue = TransferQueue()
        columns = batch.schema.names
        puts, gets = [], []
        expected = checksum(batch, check)
        for rep in range(s.inproc_reps):
            t0 = time.perf_counter()
            added = queue.add_rows(rep, batch)
            puts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lease = queue.get("bench", columns, rep, batch_size=None)
            gets.append(time.perf_counter() - t0)
            if lease is None or not np.array_equal(lease.sample_ids, added):
                raise AssertionError(f"in-process get {kind}: wrong rows")
            if checksum(lease.batch, check) != expected:
                raise AssertionError(f"in-process get {kind}: data differs")
            queue.ack(lease)
            queue.clear(rep)
        throughput_row(
            report,
            f"put_{kind}_inproc",
            f"put {kind} in-process",
            batch.nbytes,
            puts,
            "add_rows keeps a reference: no copy",
        )
        throughput_row(
            report,
            f"get_{kind}_inproc",
            f"get {kind} in-process",
            batch.nbytes,
            gets,
            "whole batch; zero-copy slices of the stored chunk",
        )
    # per-lease overhead in-process, same micro-batch size as cross-process
    queue = TransferQueue()
    added = queue.add_rows("micro", small).tolist()
    times, seen = [], []
    while True:
        t0 = time.perf_counter()
        lease = queue.get("bench", small.schema.names, "micro", batch_size=MICRO_ROWS)
        if lease is None:
            break
        queue.ack(lease)
        times.append(time.perf_counter() - t0)
        seen.extend(lease.sample_ids.tolist())
    if sorted(seen) != added:
        raise AssertionError("in-process micro-batch get: rows lost or duplicated")
    total = sum(times)
    report.figures.update(
        {
            "get_small_inproc_micro_s": total,
            "get_small_inproc_micro_lease_ms": total / len(times) * 1e3,
        }
    )
    report.add(
        Row(
            f"get small in-process, {len(times)} x {MICRO_ROWS} rows",
            size_str(small.nbytes),
            ms(total),
            rate_str(gibs(small.nbytes, total)),
            f"{total / len(times) * 1e3:.3f} ms per get+ack",
        )
    )


def timed_gets(
    client: Client,
    queue: DistributedTransferQueue,
    partition: str,
    columns: list[str],
    check: str,
    expected: float | int,
    put_ids: list[int],
    reps: int,
    *,
    prefix: str,
    worker: str,
) -> list[float]:
    """Whole-partition gets on `worker` (a new task name each: it sees every row again),
    each verified (same ids, same checksum); the first is a warm-up and is dropped."""
    times = []
    for rep in range(reps + 1):
        res = client.submit(
            task_get, queue, f"{prefix}{rep}", partition, columns, check,
            workers=[worker], pure=False,
        ).result()  # fmt: skip
        if res["check"] != expected or res["ids"] != put_ids:
            raise AssertionError(f"get {partition} on {worker}: rows or data differ")
        times.append(res["seconds"])
    return times[1:]


def bench_cross_process(
    report: Report,
    s: Settings,
    client: Client,
    a: str,
    b: str,
    small: pa.RecordBatch,
    ceilings: dict[str, float],
) -> dict[str, Any]:
    """Put on worker A, get on worker B (both timed inside the tasks)."""
    out: dict[str, Any] = {"verified": True}
    queue = DistributedTransferQueue(client=client)
    report.section(f"cross-process DistributedTransferQueue (put on A={a}, get on B={b})")
    kinds = (
        ("small", SMALL_CHECK, "list<float32>"),
        ("small_fixed", SMALL_CHECK, "fixed_size_list<float32, 8192>"),
        ("complex", COMPLEX_CHECK, "ragged tokens/logprobs, string, scalars"),
    )
    for kind, check, what in kinds:
        data = client.submit(task_make, kind, s.rows, workers=[a], pure=False)
        nbytes = client.submit(lambda batch: batch.nbytes, data, workers=[a], pure=False).result()
        names = client.submit(lambda batch: batch.schema.names, data, workers=[a], pure=False)
        columns = names.result()
        expected = client.submit(task_checksum, data, check, workers=[a], pure=False).result()
        label = kind.replace("_fixed", " (fixed_size_list)")
        # put: data stays on A (kept as the batch A wrote); only metadata goes to the scheduler
        puts, put_ids = [], []
        for rep in range(s.put_reps + 1):
            part = f"{kind}-put{rep}"
            res = client.submit(task_put, queue, part, data, workers=[a], pure=False).result()
            put_ids = res["ids"]
            if rep:
                puts.append(res["seconds"])
            if rep < s.put_reps:
                queue.clear(part)  # keep the last one: it is what B reads
        partition = f"{kind}-put{s.put_reps}"
        if kind != "small_fixed":
            throughput_row(
                report,
                f"put_{kind}_cross",
                f"put {label} on worker A",
                nbytes,
                puts,
                f"{what}; data stays on A, metadata to the scheduler",
            )

        # get on B: a fresh task name sees every row again
        args = (client, queue, partition, columns, check, expected, put_ids, s.remote_reps)
        try:
            gets = timed_gets(*args, prefix="get", worker=b)
            local = timed_gets(*args, prefix="local", worker=a) if kind == "small" else []
        except AssertionError:
            out["verified"] = False
            raise
        best_t, med_t = summary(gets)
        pct_best = 100 * gibs(nbytes, best_t) / ceilings["tcp_best"]
        pct_med = 100 * gibs(nbytes, med_t) / ceilings["tcp_median"]
        throughput_row(
            report,
            f"get_{kind}_cross",
            f"get {label} on worker B",
            nbytes,
            gets,
            f"{pct_best:.0f}% of TCP best ({pct_med:.0f}% median/median); {what}; verified",
        )
        report.figures[f"get_{kind}_cross_pct_tcp_best"] = pct_best
        report.figures[f"get_{kind}_cross_pct_tcp_median"] = pct_med
        out[f"get_{kind}_pct_tcp"] = pct_best
        if kind == "small":
            # same-worker get: the zero-copy local path of the distributed queue
            throughput_row(
                report,
                "get_small_local",
                "get small on worker A (holder)",
                nbytes,
                local,
                "same process as the data: zero-copy; verified",
            )
            # micro-batches: per-lease overhead
            res = client.submit(
                task_get_micro,
                queue,
                "micro",
                partition,
                columns,
                MICRO_ROWS,
                workers=[b],
                pure=False,
            ).result()
            if sorted(res["ids"]) != put_ids:
                out["verified"] = False
                raise AssertionError("micro-batch get: rows lost or duplicated")
            total, leases = sum(res["times"]), len(res["times"])
            per = total / leases
            report.figures.update(
                {
                    "get_small_cross_micro_s": total,
                    "get_small_cross_micro_gibs": gibs(nbytes, total),
                    "get_small_cross_micro_lease_ms": per * 1e3,
                    "get_small_cross_micro_leases": leases,
                }
            )
            report.add(
                Row(
                    f"get small on worker B, {leases} x {MICRO_ROWS} rows",
                    size_str(nbytes),
                    ms(total),
                    rate_str(gibs(nbytes, total)),
                    f"{per * 1e3:.1f} ms per get+ack of {size_str(nbytes // leases)}",
                )
            )
        queue.clear(partition)
        del data
    # client -> worker put: here the bytes do move (to a worker picked round-robin)
    puts = []
    for rep in range(s.put_reps + 1):
        t0 = time.perf_counter()
        queue.add_rows(f"client-put{rep}", small)
        if rep:
            puts.append(time.perf_counter() - t0)
        queue.clear(f"client-put{rep}")
    throughput_row(
        report,
        "put_small_client",
        "put small from the client process",
        small.nbytes,
        puts,
        "bytes shipped client -> a worker (tq_store)",
    )
    queue.close()
    return out


def bench_control_plane(
    report: Report, s: Settings, client: Client, a: str, b: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"verified": True}
    report.section("control plane (1 int64 column; data on A unless said)")
    queue = DistributedTransferQueue(client=client)
    warmup = 20
    rpc = client.submit(task_rpc_latency, s.latency_pairs, workers=[b], pure=False).result()
    p50, p99 = percentiles(rpc)
    report.figures.update({"rpc_echo_p50_ms": p50 * 1e3, "rpc_echo_p99_ms": p99 * 1e3})
    report.add(
        Row(
            "dask scheduler round trip p50/p99",
            "",
            f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f} ms",
            "",
            "plain echo from a worker task: the floor under each queue call",
        )
    )
    rows = LATENCY_ROWS
    for where, consumer, holder in (("B, data on A", b, a), ("A, data on A", a, a)):
        part = f"latency-{consumer}"
        client.submit(task_put, queue, part, int_rows(rows), workers=[holder], pure=False).result()
        res = client.submit(
            task_latency, queue, part, s.latency_pairs, warmup, rows // MICRO_ROWS,
            workers=[consumer], pure=False,
        ).result()  # fmt: skip
        if res["duplicated"]:
            out["verified"] = False
            raise AssertionError(f"latency: {res['duplicated']} rows delivered twice")
        pairs = [g + k for g, k in zip(res["get"], res["ack"], strict=True)]
        local = consumer == holder
        key = "local" if local else "remote"
        for label, values in (("get+ack", pairs), ("get", res["get"]), ("ack", res["ack"])):
            p50, p99 = percentiles(values)
            report.figures[f"dispatch_{key}_{label.replace('+', '_')}_p50_ms"] = p50 * 1e3
            report.figures[f"dispatch_{key}_{label.replace('+', '_')}_p99_ms"] = p99 * 1e3
            if local and label == "ack":
                continue
            report.add(
                Row(
                    f"dispatch {label} p50/p99 on {where}",
                    f"{MICRO_ROWS} rows",
                    f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f} ms",
                    "",
                    f"{s.latency_pairs} sequential leases from a {rows}-row partition",
                )
            )
        if not local:
            out["get_p50"] = percentiles(res["get"])[0]
            out["pair_p50"] = percentiles(pairs)[0]
        queue.clear(part)

    # dispatches/s: rows in 4 chunks alternately on A and B, drained by N consumers
    part = "dispatch"
    quarter = s.dispatch_rows // 4
    expected: set[int] = set()
    for i in range(4):
        batch = int_rows(quarter, start=i * quarter)
        holder = (a, b)[i % 2]
        res = client.submit(task_put, queue, part, batch, workers=[holder], pure=False).result()
        expected.update(res["ids"])
    # warm-up (untimed): open the connections 64 concurrent callers need, on both workers
    for i, fn in enumerate((task_consume_async, task_consume_threads)):
        warm = f"warm{i}"
        client.submit(task_put, queue, warm, int_rows(256), workers=[a], pure=False).result()
        futures = [client.submit(fn, queue, "w", warm, 32, workers=[w], pure=False) for w in (a, b)]
        for f in futures:
            f.result()
        queue.clear(warm)
    levels: list[tuple[str, int, Callable]] = [
        ("async", 1, task_consume_async),
        ("async", 8, task_consume_async),
        ("async", 64, task_consume_async),
        ("threads", 64, task_consume_threads),
        ("async, acks piggybacked", 64, task_consume_async_piggyback),
    ]
    for style, consumers, fn in levels:
        spread = [(b, 1)] if consumers == 1 else [(a, consumers // 2), (b, consumers // 2)]
        rates, walls = [], []
        for rep in range(s.dispatch_reps):
            task = f"{style}{consumers}-{rep}"  # a new task sees every row again
            futures = [
                client.submit(fn, queue, task, part, k, workers=[w], pure=False) for w, k in spread
            ]
            results = [f.result() for f in futures]
            ids = [i for r in results for i in r["ids"]]
            wall = max(r["end"] for r in results) - min(r["start"] for r in results)
            duplicated = len(ids) - len(set(ids))
            lost = len(expected - set(ids))
            if duplicated or lost or set(ids) != expected:
                out["verified"] = False
                raise AssertionError(
                    f"dispatch @{consumers} {style}: {duplicated} rows delivered twice, {lost} lost"
                )
            rates.append(len(ids) / wall)
            walls.append(wall)
        best, med = max(rates), statistics.median(rates)
        key = f"dispatch_rate_{style.replace(', ', '_').replace(' ', '_')}_{consumers}"
        report.figures.update(
            {
                f"{key}_best": best,
                f"{key}_median": med,
                f"{key}_leases": len(expected),
                f"{key}_reps": len(rates),
            }
        )
        where = "1 coroutine on B" if consumers == 1 else f"{consumers // 2} per worker"
        kind = "threads, sync get" if style == "threads" else "asyncio coroutines"
        report.add(
            Row(
                f"dispatches/s @{consumers} ({style})",
                f"{len(expected)} leases",
                f"{min(walls):.2f} s / {statistics.median(walls):.2f} s",
                f"{best:.0f} / {med:.0f} /s",
                f"get(1 row)+ack; {kind}, {where}; every rep: 0 dup / 0 lost",
            )
        )
        out[f"rate_{style}_{consumers}"] = best
    if "rate_async, acks piggybacked_64" in out:
        out["rate_piggyback_64"] = out.pop("rate_async, acks piggybacked_64")
    queue.clear(part)

    # the RPC ceiling under those numbers: plain scheduler round trips, 32 coroutines/worker
    calls = max(20, s.dispatch_rows // 64)
    futures = [
        client.submit(task_rpc_concurrent, 32, calls, workers=[w], pure=False) for w in (a, b)
    ]
    results = [f.result() for f in futures]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    rpcs = sum(r["calls"] for r in results) / wall
    report.figures["rpc_echo_rate_64"] = rpcs
    report.add(
        Row(
            "dask scheduler round trips/s @64",
            "",
            f"{wall:.2f} s",
            f"{rpcs:.0f} /s",
            "plain echo, 32 coroutines per worker: ceiling for any 1-RPC-per-op design",
        )
    )

    # a remote dispatch on a large partition: the cost of a get grows with partition rows
    big = s.scaling_rows[-1]
    client.submit(task_put, queue, "big", int_rows(big), workers=[a], pure=False).result()
    res = client.submit(
        task_latency, queue, "big", 200, warmup, big // MICRO_ROWS, workers=[b], pure=False
    ).result()
    p50, p99 = percentiles(res["get"])
    report.figures.update({"dispatch_remote_get_p50_ms_big": p50 * 1e3, "big_rows": big})
    report.add(
        Row(
            "dispatch get p50/p99 on B, large partition",
            f"{MICRO_ROWS} rows",
            f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f} ms",
            "",
            f"200 leases from a {big}-row partition "
            f"(vs {report.figures['dispatch_remote_get_p50_ms']:.2f} ms at {rows} rows)",
        )
    )
    queue.close()
    return out


def bench_in_process_scaling(report: Report, s: Settings) -> None:
    """In-process get(1)+ack cost against partition size (same Controller as the scheduler)."""
    report.section("control-plane scaling, in-process get(1 row)+ack")
    for rows in s.scaling_rows:
        queue = TransferQueue()
        queue.add_rows(0, int_rows(rows))
        times = []
        for _ in range(min(300, rows)):
            t0 = time.perf_counter()
            lease = queue.get("t", ["x"], 0, batch_size=1)
            queue.ack(lease)
            times.append(time.perf_counter() - t0)
        p50, p99 = percentiles(times)
        report.figures[f"inproc_get1_ack_p50_us_{rows}"] = p50 * 1e6
        report.add(
            Row(
                f"in-process get+ack p50/p99 @{rows} rows",
                "1 row",
                f"{p50 * 1e6:.0f} / {p99 * 1e6:.0f} us",
                f"{1 / p50:.0f} /s",
                "one thread; /s = 1 / p50",
            )
        )


# ---- transferqueue (optional) ---------------------------------------------------------------


def _baseline_module() -> Any | None:
    """benchmarks/transferqueue_baseline.py, the driver of the package's own perftest."""
    path = Path(__file__).resolve().with_name("transferqueue_baseline.py")
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("transferqueue_baseline", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _package_importable() -> bool:
    """Is the real `transfer_queue` package importable here (not this very file)?"""
    here = Path(__file__).resolve()
    for name in ("transfer_queue", "transferqueue"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).resolve() != here:
            return True
    return False


def bench_transferqueue(report: Report, s: Settings, quick: bool) -> None:
    """transferqueue==0.1.11 (SimpleStorage), only if some interpreter can import it.

    The measurement itself is `benchmarks/transferqueue_baseline.py`, which follows the
    package's own perftest (writer and reader Ray actors, kv_batch_put / kv_batch_get of
    the same rows x 9 x 8192 fp32 TensorDict) in a separate interpreter
    (`$ASYNCFLOW_TQ_PYTHON`, else this one): the package is not a dependency of ours.
    """
    try:
        baseline = _baseline_module()
        python = baseline.find_interpreter() if baseline is not None else None
        problem = ""
    except Exception as exc:  # a sibling file being edited must not sink this benchmark
        baseline, python, problem = None, None, f"{type(exc).__name__}: {exc}"
    if python is None:
        if baseline is None and _package_importable():
            line = "transferqueue installed but benchmarks/transferqueue_baseline.py is "
            line += f"unusable ({problem})" if problem else "missing"
        else:
            line = TRANSFERQUEUE_SKIPPED
        report.section(line)
        report.figures["transferqueue"] = line
        print(line, flush=True)
        return
    print(f"  .. transferqueue baseline with {python} (its perftest pauses are untimed)")
    try:
        result = baseline.run_baseline(
            python,
            rows=s.rows,
            fields=FIELDS,
            seq_len=WIDTH,
            complex_case=False,
            iterations=1 if quick else 3,
            timeout=75.0 if quick else 300.0,
            iter_sleep=0.0 if quick else 10.0,
        )
    except Exception as exc:
        result = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    report.figures.update({f"transferqueue_{k}": v for k, v in result.items()})
    needed = {f"{v}_{m}" for v in ("put", "get") for m in ("gibs_best", "gibs_median")}
    needed |= {"bytes", "put_seconds_median", "get_seconds_median"}
    if result.get("available") and not needed <= set(result):
        result = {"available": False, "reason": f"result lacks {sorted(needed - set(result))}"}
    if not result.get("available"):
        line = f"transferqueue comparison failed: {result.get('reason', '?')}"
        report.section(line[:300])
        return
    report.section(
        f"transferqueue {result.get('version')} (SimpleStorage, {result.get('storage_units')} "
        "units, its own perftest flow; Ray actors on this machine)"
    )
    ours = {
        "put": ("put_small_client_gibs_best", "our client put (bytes move)"),
        "get": ("get_small_cross_gibs_best", "our get on worker B"),
    }
    for verb in ("put", "get"):
        theirs = result[f"{verb}_gibs_best"]
        key, what = ours[verb]
        ratio = report.figures[key] / theirs
        report.figures[f"transferqueue_{verb}_ratio_ours"] = ratio
        best_t = result["bytes"] / GIB / theirs
        report.add(
            Row(
                f"transferqueue {verb} small",
                size_str(int(result["bytes"])),
                f"{ms(best_t)} / {ms(result[f'{verb}_seconds_median'])}",
                f"{rate_str(theirs)} / {rate_str(result[f'{verb}_gibs_median'])}",
                f"{what} / theirs = {ratio:.2f}x (best / best)",
            )
        )


# ---- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and repetitions (<2 min)")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    started = time.perf_counter()
    meta = describe("pyarrow", "numpy", "dask", "distributed") | {
        "mode": "quick" if args.quick else "full",
        "settings": s.__dict__,
    }
    print(
        f"asyncflow TransferQueue benchmark ({meta['mode']}) -- {meta['date']}\n"
        f"machine: {meta['cores']} cores ({meta['cpu']}), {meta['memory_gib']} GiB RAM, "
        f"{meta['platform']}, load average {meta['load_average_1m_at_start']}\n"
        f"python {meta['python']}, pyarrow {meta['pyarrow']}, numpy {meta['numpy']}, "
        f"dask/distributed {meta['dask']}/{meta['distributed']}, "
        f"asyncflow {meta['asyncflow_commit']}",
        flush=True,
    )
    report = Report()
    small, complex_ = make_small(s.rows), make_complex(s.rows)
    print(
        f"data: small = {s.rows} rows x {FIELDS} x {WIDTH} fp32 = {size_str(small.nbytes)}; "
        f"complex = {s.rows} rows = {size_str(complex_.nbytes)} "
        f"(mean response {np.mean(pc.list_value_length(complex_.column('response_ids'))):.0f} "
        "tokens)",
        flush=True,
    )
    report.figures.update(
        {"rows": s.rows, "small_bytes": small.nbytes, "complex_bytes": complex_.nbytes}
    )

    ceilings = bench_ceilings(report, s, small)
    bench_in_process(report, s, small, complex_)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        a, b = sorted(client.scheduler_info()["workers"])
        data = bench_cross_process(report, s, client, a, b, small, ceilings)
        control = bench_control_plane(report, s, client, a, b)
    bench_in_process_scaling(report, s)
    bench_transferqueue(report, s, args.quick)

    pct = data["get_small_pct_tcp"]
    report.target("get small cross-process >= 60% of raw TCP", f"{pct:.0f}%", pct >= 60)
    report.target(
        "dispatch p50 <= 2 ms (get of 64 rows, B from A)",
        f"{control['get_p50'] * 1e3:.2f} ms",
        control["get_p50"] <= 2e-3,
    )
    report.target(
        "dispatch p50 <= 2 ms (get+ack pair)",
        f"{control['pair_p50'] * 1e3:.2f} ms",
        control["pair_p50"] <= 2e-3,
    )
    modes = {
        "async": control["rate_async_64"],
        "threads": control["rate_threads_64"],
        "acks piggybacked": control.get("rate_piggyback_64", 0.0),
    }
    mode, best64 = max(modes.items(), key=lambda item: item[1])
    report.target("dispatches/s @64 consumers >= 5000", f"{best64:.0f} /s ({mode})", best64 >= 5000)
    verified = data["verified"] and control["verified"]
    report.target(
        "no row delivered twice or lost (all runs)",
        "checked" if verified else "violated",
        verified,
        "FAIL",
    )
    report.figures["targets"] = [list(t) for t in report.targets]
    elapsed = time.perf_counter() - started
    report.figures["elapsed_s"] = elapsed
    meta["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)

    print()
    print(report.render())
    print(
        f"\n(total {elapsed:.0f} s; 1-minute load average {meta['load_average_1m_at_start']} "
        f"at start, {meta['load_average_1m_at_end']} at end, on {meta['cores']} cores: other "
        "processes on this machine skew the figures)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, **report.figures}, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
