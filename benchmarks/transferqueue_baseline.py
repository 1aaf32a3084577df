"""Baseline: put/get throughput of the public ``transferqueue`` package (SimpleStorage).

We compare our TransferQueue against Huawei's AsyncFlow TransferQueue
(``pip install transferqueue==0.1.11``: Ray actors + ZMQ + msgpack, SimpleStorage
backend). That package is *not* a dependency of asyncflow; it lives in a separate
interpreter (e.g. a virtualenv), so this file has two faces:

* **Script**, run with an interpreter that can ``import transfer_queue``::

      /path/to/venv/bin/python benchmarks/transferqueue_baseline.py \\
          --rows 1024 --fields 9 --seq-len 8192 [--complex] [--iterations 3] --json OUT

  It follows the package's own ``scripts/performance_test/perftest.py``: the same
  TensorDict test cases ("small": fp32 fields of shape ``(rows, seq_len)``;
  "complex": 1/3 regular, 1/3 jagged nested tensors, 1/3 ``NonTensorStack``
  strings), a writer Ray actor timing ``tq.kv_batch_put`` and a different reader
  actor timing ``tq.kv_batch_get`` of the same keys (listed with ``tq.kv_list``),
  ``tq.kv_clear`` after each iteration, the same pauses between operations, and
  the same data-size formula (throughput = nominal size / wall time of the
  ``ray.get`` of the actor call). It writes a flat JSON dict and prints one summary
  line on stdout (progress goes to stderr).

* **Library**, importable from any interpreter using only the standard library (it
  never imports ray, torch or transfer_queue in the caller's process):
  :func:`find_interpreter` and :func:`run_baseline`, which runs the script in a
  subprocess and returns its JSON dict, or ``{"available": False, "reason": ...}``.

Localhost only: Ray is started in-process (``address="local"``) with every
socket bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray use the
loopback address as the node IP; passing ``_node_ip_address="127.0.0.1"`` is not
enough, Ray resolves it back to the external interface), so the TransferQueue
controller and storage units, which bind ZMQ sockets on Ray's node IP, are
loopback-only as well.

The test-case builders below are adapted from transferqueue 0.1.11's
``scripts/performance_test/perftest.py`` (Copyright 2025 Huawei Technologies Co.,
Ltd. and The TransferQueue Team, Apache License 2.0), restricted to ``device="cpu"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["EXPECTED_VERSION", "find_interpreter", "payload_bytes", "run_baseline"]

EXPECTED_VERSION = "0.1.11"
ENV_PYTHON = "ASYNCFLOW_TQ_PYTHON"
_SCRIPT = os.path.abspath(__file__)
_GIB = 1024**3
_PARTITION = "train_0"  # the partition id used by their perftest
_BYTES_PER_ELEMENT = 4  # float32, as in their perftest
# Ray settings for a single localhost machine; see the module docstring.
_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}
_PROBE_CODE = "import sys, transfer_queue; sys.stdout.write(transfer_queue.__version__)"


# --------------------------------------------------------------------------------------
# Library side (standard library only)
# --------------------------------------------------------------------------------------


def _shadows_transfer_queue(directory: str) -> bool:
    """True if ``directory`` on sys.path would shadow the real ``transfer_queue`` package.

    ``benchmarks/transfer_queue.py`` (our own benchmark) sits next to this file, and
    running ``python benchmarks/transferqueue_baseline.py`` puts ``benchmarks/`` first
    on sys.path.
    """
    directory = os.path.abspath(directory or os.curdir)
    return os.path.isfile(os.path.join(directory, "transfer_queue.py"))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_RAY_ENV)
    if env.get("PYTHONPATH"):
        kept = [p for p in env["PYTHONPATH"].split(os.pathsep) if not _shadows_transfer_queue(p)]
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return env


def _tail(text: str | bytes | None, limit: int = 1500) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _probe(python: str, timeout: float) -> tuple[bool, str]:
    """Can ``python`` import transfer_queue? Returns (ok, version or reason)."""
    with tempfile.TemporaryDirectory(prefix="tq-probe-") as cwd:
        try:
            proc = subprocess.run(
                [python, "-c", _PROBE_CODE],
                cwd=cwd,  # an empty cwd so '' on sys.path cannot shadow the package
                env=_child_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            return False, f"interpreter not found: {python}"
        except PermissionError as exc:
            return False, f"interpreter not executable: {python}: {exc}"
        except subprocess.TimeoutExpired:
            return False, f"`{python} -c 'import transfer_queue'` timed out after {timeout:.0f}s"
    if proc.returncode != 0:
        last = _tail(proc.stderr, 400).splitlines()
        return False, f"{python} cannot import transfer_queue: {last[-1] if last else 'no output'}"
    return True, proc.stdout.strip()


def find_interpreter() -> str | None:
    """An interpreter that can ``import transfer_queue``, or None.

    Tries ``$ASYNCFLOW_TQ_PYTHON`` first, then ``sys.executable``.
    """
    candidates = [os.environ.get(ENV_PYTHON, "").strip(), sys.executable]
    for python in candidates:
        if python and _probe(python, timeout=120.0)[0]:
            return python
    return None


def payload_bytes(rows: int, fields: int, seq_len: int, complex_case: bool) -> int:
    """Nominal data size in bytes, computed exactly as their perftest does (device "cpu").

    Small: ``fields * rows * seq_len * 4``. Complex: regular fields count fully,
    nested fields ``int(rows * (1 + seq_len) / 2 * 4)`` (mean of the arithmetic
    progression of lengths), string fields ``rows * seq_len * 4``.
    """
    regular = rows * seq_len * _BYTES_PER_ELEMENT
    if not complex_case:
        return regular * fields
    n_regular = (fields + 2) // 3
    n_nested = (fields + 2) // 3
    n_strings = fields - n_regular - n_nested
    nested = int(rows * ((1 + seq_len) / 2) * _BYTES_PER_ELEMENT)
    strings = rows * seq_len * _BYTES_PER_ELEMENT
    return regular * n_regular + nested * n_nested + strings * n_strings


def _kill_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop the benchmark process we started and its process group (Ray's raylet and GCS).

    SIGTERM lets the driver run tq.close()/ray.shutdown(); whatever is left of the group
    after ``grace`` seconds, or after the driver has exited, gets SIGKILL. Ray workers
    sit in their own process groups and exit when their raylet does.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10.0)


def run_baseline(
    python: str,
    rows: int,
    fields: int,
    seq_len: int,
    complex_case: bool,
    iterations: int,
    timeout: float,
    *,
    op_sleep: float = 2.0,
    iter_sleep: float = 10.0,
) -> dict[str, Any]:
    """Run the baseline in a subprocess with ``python`` and return its JSON dict.

    Never raises for an unusable interpreter, a failed run or a timeout: returns
    ``{"available": False, "reason": "..."}`` instead. ``timeout`` (seconds) bounds the
    whole call, import probe included (on a timeout the run gets up to 30 s more to shut
    Ray down before it is killed). ``op_sleep``/``iter_sleep`` are the untimed
    pauses of their perftest (2 s between operations, 10 s between iterations).
    """
    if not python:
        return {"available": False, "reason": "no interpreter given (set $ASYNCFLOW_TQ_PYTHON)"}
    deadline = time.monotonic() + timeout
    ok, info = _probe(python, timeout=max(1.0, min(120.0, timeout)))
    if not ok:
        return {"available": False, "reason": info}
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return {"available": False, "reason": f"timed out after {timeout:.0f}s (import probe)"}

    with tempfile.TemporaryDirectory(prefix="tq-baseline-") as workdir:
        out = os.path.join(workdir, "result.json")
        cmd = [
            python,
            _SCRIPT,
            "--rows",
            str(rows),
            "--fields",
            str(fields),
            "--seq-len",
            str(seq_len),
            "--iterations",
            str(iterations),
            "--op-sleep",
            str(op_sleep),
            "--iter-sleep",
            str(iter_sleep),
            "--json",
            out,
        ]
        if complex_case:
            cmd.append("--complex")
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,  # Ray adds the cwd to its workers' sys.path
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so a timeout can stop the whole Ray session
        )
        try:
            stdout, stderr = proc.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            return {
                "available": False,
                "reason": f"timed out after {timeout:.0f}s; stderr tail: {_tail(stderr, 600)}",
            }
        result: dict[str, Any] | None = None
        if os.path.exists(out):
            try:
                with open(out) as fh:
                    result = json.load(fh)
            except (OSError, ValueError) as exc:
                result = {"available": False, "reason": f"unreadable result JSON: {exc}"}
    if proc.returncode != 0:
        reason = (result or {}).get("reason") or f"exit code {proc.returncode}"
        return {
            "available": False,
            "reason": f"baseline run failed ({reason}); stderr tail: {_tail(stderr, 800)}",
        }
    if not isinstance(result, dict):
        return {
            "available": False,
            "reason": f"baseline run wrote no JSON; stdout: {_tail(stdout, 300)}",
        }
    return result


# --------------------------------------------------------------------------------------
# Script side (runs inside the transferqueue interpreter; imports ray/torch lazily)
# --------------------------------------------------------------------------------------


def _create_test_case(rows: int, seq_len: int, fields: int) -> Any:
    """Their ``create_test_case`` (device "cpu"): ``fields`` fp32 tensors (rows, seq_len)."""
    import torch
    from tensordict import TensorDict

    batch = TensorDict(batch_size=(rows,))
    for i in range(fields):
        batch.set(f"field_{i}", torch.randn(rows, seq_len, dtype=torch.float32))
    return batch


def _create_complex_test_case(rows: int, seq_len: int, fields: int) -> Any:
    """Their ``create_complex_test_case`` (device "cpu")."""
    import torch
    from tensordict import NonTensorStack, TensorDict

    n_regular = (fields + 2) // 3
    n_nested = (fields + 2) // 3
    n_strings = fields - n_regular - n_nested
    batch = TensorDict(batch_size=(rows,))
    # 1. regular tensors
    for i in range(n_regular):
        batch.set(f"field_{i}", torch.randn(rows, seq_len, dtype=torch.float32))
    # 2. jagged nested tensors, lengths an arithmetic progression from 1 to seq_len
    step = (seq_len - 1) / (rows - 1) if rows > 1 else 0
    lengths = [max(1, min(round(1 + j * step), seq_len)) for j in range(rows)]
    total = sum(lengths)
    for i in range(n_nested):
        flat = torch.randn(total, dtype=torch.float32)
        nested = torch.nested.as_nested_tensor(torch.split(flat, lengths), layout=torch.jagged)
        batch.set(f"nested_field_{i}", nested)
    # 3. NonTensorStack strings of seq_len * 4 characters each
    n_chars = seq_len * _BYTES_PER_ELEMENT
    for i in range(n_strings):
        strings = [os.urandom(n_chars // 2).hex() for _ in range(rows)]
        batch.set(f"nontensor_field_{i}", NonTensorStack.from_list(strings))
    return batch


def _fingerprint(batch: Any, names: list[str]) -> dict[str, Any]:
    """Order-insensitive per-field summary, to check that a get returned what was put."""
    import hashlib

    import torch

    out: dict[str, Any] = {}
    for name in names:
        value = batch[name]
        if torch.is_tensor(value):
            flat = value.values() if value.is_nested else value
            out[name] = ["tensor", int(flat.numel()), float(flat.double().sum().item())]
        else:
            items = value.tolist() if hasattr(value, "tolist") else list(value)
            digest = hashlib.sha1("\n".join(sorted(map(str, items))).encode()).hexdigest()
            out[name] = ["other", len(items), digest]
    return out


def _same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    if sorted(a) != sorted(b):
        return f"field names differ: put {sorted(a)} got {sorted(b)}"
    for name in a:
        (ka, na, va), (kb, nb, vb) = a[name], b[name]
        if ka != kb or na != nb:
            return f"field {name}: put {ka}/{na} elements, got {kb}/{nb}"
        same = math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-6) if ka == "tensor" else va == vb
        if not same:
            return f"field {name}: contents differ"
    return None


class _TQClient:
    """Their ``TQClientActor``; wrapped with ``ray.remote`` at run time."""

    def __init__(self, config: dict[str, Any], use_complex_case: bool = False):
        self.config = config
        self.use_complex_case = use_complex_case
        self.test_data: Any = None
        self.test_keys: list[str] | None = None

    def initialize(self) -> None:
        import transfer_queue as tq
        from omegaconf import OmegaConf

        tq.init(OmegaConf.create(self.config))

    def create_test_case(self, rows: int, seq_len: int, fields: int) -> list[str]:
        if self.use_complex_case:
            self.test_data = _create_complex_test_case(rows, seq_len, fields)
        else:
            self.test_data = _create_test_case(rows, seq_len, fields)
        self.test_keys = [f"test_key_{i}" for i in range(rows)]
        return list(self.test_data.keys())

    def put(self, partition_id: str) -> None:
        import transfer_queue as tq

        tq.kv_batch_put(keys=self.test_keys, partition_id=partition_id, fields=self.test_data)

    def list_keys(self, partition_id: str) -> list[str]:
        import transfer_queue as tq

        info = tq.kv_list(partition_id=partition_id)
        return list(info[partition_id].keys()) if partition_id in info else []

    def get_data(self, partition_id: str, keys: list[str] | None = None) -> None:
        import transfer_queue as tq

        tq.kv_batch_get(keys=self.test_keys if keys is None else keys, partition_id=partition_id)

    def fingerprint_local(self, names: list[str]) -> dict[str, Any]:
        return _fingerprint(self.test_data, names)

    def fingerprint_remote(self, partition_id: str, keys: list[str], names: list[str]) -> Any:
        import transfer_queue as tq

        return _fingerprint(tq.kv_batch_get(keys=keys, partition_id=partition_id), names)

    def delete(self, partition_id: str, keys: list[str] | None = None) -> None:
        import transfer_queue as tq

        tq.kv_clear(keys=self.test_keys if keys is None else keys, partition_id=partition_id)

    def close(self) -> None:
        import transfer_queue as tq

        tq.close()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _log(message: str) -> None:
    print(f"[tq-baseline] {message}", file=sys.stderr, flush=True)


def _sanitize_import_path() -> None:
    """Make ``import transfer_queue`` (here and in Ray workers) find the real package.

    The script's own directory is always dropped (not only while it holds a
    ``transfer_queue.py``): Ray forwards it to its workers' sys.path, and a file
    created there later would still shadow the package in the workers.
    """
    here = os.path.dirname(_SCRIPT)
    sys.path[:] = [
        p
        for p in sys.path
        if os.path.abspath(p or os.curdir) != here and not _shadows_transfer_queue(p)
    ]
    for key, value in _child_env().items():
        os.environ[key] = value
    if _shadows_transfer_queue(os.curdir):
        # Ray puts the driver's cwd on its workers' sys.path.
        os.chdir(tempfile.mkdtemp(prefix="tq-baseline-cwd-"))


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import transfer_queue as tq

    version = getattr(tq, "__version__", "unknown")
    if version != EXPECTED_VERSION:
        _log(f"warning: transfer_queue {version} (this baseline targets {EXPECTED_VERSION})")
    units = args.storage_units
    # Logical CPUs: controller (1) + storage units (1 each) + two clients (0.001 each).
    num_cpus = args.ray_num_cpus if args.ray_num_cpus is not None else units + 2
    # As their perftest: the backend config, capacity = batch size * iterations.
    config = {
        "backend": {
            "storage_backend": "SimpleStorage",
            "SimpleStorage": {
                "total_storage_size": args.rows * args.iterations,
                "num_data_storage_units": units,
            },
        }
    }
    size = payload_bytes(args.rows, args.fields, args.seq_len, args.complex)
    _log(
        f"transfer_queue {version}, ray {ray.__version__}: {args.rows} rows x {args.fields} "
        f"fields x {args.seq_len} ({'complex' if args.complex else 'small'}), "
        f"{size / _GIB:.4f} GiB, {units} storage units, Ray num_cpus={num_cpus}"
    )
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=int(args.object_store_gib * _GIB),
        include_dashboard=False,
        log_to_driver=args.verbose,
        logging_level="INFO" if args.verbose else "WARNING",
    )
    # Ray's core worker installs a C-level SIGTERM handler that dumps a stack and kills
    # the driver without cleanup; put ours back so SIGTERM unwinds through `finally`.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    writer = reader = None
    put_s: list[float] = []
    get_s: list[float] = []
    verified: bool | None = None
    failed = True
    try:
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":
            _log(f"warning: Ray node IP is {node_ip}, not 127.0.0.1")
        # Their perftest: tiny CPU request, pinned to the head node via node:<ip>.
        options = {"num_cpus": 0.001, "resources": {f"node:{node_ip}": 0.001}}
        actor_cls = ray.remote(_TQClient)
        writer = actor_cls.options(**options).remote(config, args.complex)
        reader = actor_cls.options(**options).remote(config, args.complex)
        started = time.perf_counter()
        ray.get(writer.initialize.remote())  # writer first: it creates controller + storage
        ray.get(reader.initialize.remote())
        _log(f"tq.init done in {time.perf_counter() - started:.1f}s")

        started = time.perf_counter()
        names = ray.get(writer.create_test_case.remote(args.rows, args.seq_len, args.fields))
        _log(f"test data created in {time.perf_counter() - started:.1f}s")

        for it in range(args.iterations):
            started = time.perf_counter()
            ray.get(writer.put.remote(partition_id=_PARTITION))
            put_s.append(time.perf_counter() - started)
            time.sleep(args.op_sleep)

            keys = ray.get(reader.list_keys.remote(partition_id=_PARTITION))
            if len(keys) != args.rows:
                raise RuntimeError(f"kv_list returned {len(keys)} keys, expected {args.rows}")
            time.sleep(args.op_sleep)

            started = time.perf_counter()
            ray.get(reader.get_data.remote(partition_id=_PARTITION, keys=keys))
            get_s.append(time.perf_counter() - started)

            if it == 0 and args.verify:  # untimed: does a get return what was put?
                want = ray.get(writer.fingerprint_local.remote(names))
                got = ray.get(reader.fingerprint_remote.remote(_PARTITION, keys, names))
                problem = _same_fingerprint(want, got)
                if problem:
                    raise RuntimeError(f"data read back differs from data written: {problem}")
                verified = True
            time.sleep(args.op_sleep)

            ray.get(writer.delete.remote(partition_id=_PARTITION, keys=keys))
            _log(
                f"iteration {it + 1}/{args.iterations}: "
                f"put {put_s[-1]:.3f}s ({size / _GIB / put_s[-1]:.3f} GiB/s), "
                f"get {get_s[-1]:.3f}s ({size / _GIB / get_s[-1]:.3f} GiB/s)"
            )
            if it + 1 < args.iterations:
                time.sleep(args.iter_sleep)
        failed = False
    finally:
        # Short waits when unwinding an error or SIGTERM: an actor may be stuck mid-call.
        close_timeout = 10.0 if failed else 60.0
        for actor in (reader, writer):  # the writer owns controller + storage units
            if actor is not None:
                try:
                    ray.get(actor.close.remote(), timeout=close_timeout)
                except Exception as exc:
                    _log(f"warning: tq.close() failed: {type(exc).__name__}: {exc}")
        ray.shutdown()

    put_rates = [size / _GIB / s for s in put_s]
    get_rates = [size / _GIB / s for s in get_s]
    return {
        "available": True,
        "version": version,
        "backend": "SimpleStorage",
        "storage_units": units,
        "rows": args.rows,
        "fields": args.fields,
        "seq_len": args.seq_len,
        "complex": bool(args.complex),
        "iterations": args.iterations,
        "bytes": size,
        "put_gibs_best": max(put_rates),
        "put_gibs_median": statistics.median(put_rates),
        "get_gibs_best": max(get_rates),
        "get_gibs_median": statistics.median(get_rates),
        "put_seconds_median": statistics.median(put_s),
        "get_seconds_median": statistics.median(get_s),
        "verified": verified,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Put/get throughput of transferqueue {EXPECTED_VERSION} (SimpleStorage), "
        "following its own perftest."
    )
    parser.add_argument("--rows", type=int, default=1024, help="batch size (keys)")
    parser.add_argument("--fields", type=int, default=9)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument(
        "--complex",
        action="store_true",
        help="1/3 regular, 1/3 nested jagged, 1/3 NonTensorStack string fields",
    )
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--json", help="write the result dict to this file")
    parser.add_argument("--storage-units", type=int, default=2, help="SimpleStorage units")
    parser.add_argument(
        "--ray-num-cpus",
        type=float,
        default=None,
        help="logical Ray CPUs, not a core count (default: storage units + 2). The "
        "TransferQueue controller and every storage unit each reserve 1 and the two client "
        "actors 0.001, so with num_cpus=2 tq.init() waits forever for an actor to be placed",
    )
    parser.add_argument("--object-store-gib", type=float, default=1.0)
    parser.add_argument("--op-sleep", type=float, default=2.0, help="untimed pause (perftest: 2)")
    parser.add_argument(
        "--iter-sleep", type=float, default=10.0, help="untimed pause (perftest: 10)"
    )
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    parser.add_argument("--verbose", action="store_true", help="show Ray/TransferQueue logs")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.fields < 1 or args.seq_len < 1 or args.iterations < 1:
        parser.error("--rows, --fields, --seq-len and --iterations must be >= 1")
    if args.storage_units < 1:
        parser.error("--storage-units must be >= 1")
    return args


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    json_path = os.path.abspath(args.json) if args.json else None
    # SIGTERM (e.g. run_baseline's timeout) unwinds through the cleanup in _measure.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _sanitize_import_path()
    try:
        result = _measure(args)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        reason = f"{type(exc).__name__}: {exc}".strip()
        _write_json(json_path, {"available": False, "reason": reason[:2000]})
        _log(f"FAILED: {reason[:2000]}")
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return 1
    _write_json(json_path, result)
    case = "complex" if result["complex"] else "small"
    print(
        f"transferqueue {result['version']} SimpleStorage {case} {result['rows']}x"
        f"{result['fields']}x{result['seq_len']} ({result['bytes'] / _GIB:.3f} GiB, "
        f"{result['iterations']} it): put best {result['put_gibs_best']:.3f} / median "
        f"{result['put_gibs_median']:.3f} GiB/s, get best {result['get_gibs_best']:.3f} / "
        f"median {result['get_gibs_median']:.3f} GiB/s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
