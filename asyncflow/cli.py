"""`asyncflow run | graph`: the command line over the workflows registry."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from asyncflow.errors import AsyncflowError, ConfigError
from asyncflow.runtime.observe import commands as observe_commands
from asyncflow.runtime.record import commands as record_commands
from asyncflow.workflows import lookup, registry


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # `bench` hands every argument on to the benchmarks' own parser, unparsed
    args, rest = parser.parse_known_args(argv)
    if rest and args.handler is not _cmd_bench:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.handler is _cmd_bench:
        args.bench_args = rest
    try:
        return args.handler(args)
    except AsyncflowError as exc:
        print(f"asyncflow: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(sorted(registry()))
    parser = argparse.ArgumentParser(
        prog="asyncflow",
        description="RL post-training of language models as a DAG of operators on Dask.",
    )
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a workflow's post-training job",
        description=f"Run a workflow ({names}) on an embedded Dask cluster or an existing one.",
    )
    run.add_argument("workflow", help=f"workflow name ({names})")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save every replica's state every N steps (0: never)",
    )
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its latest checkpoint, with its saved config",
    )
    run.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="sync: each stage over the whole step, then the next (reproducible); "
        "async: micro-batches stream through, rollout overlaps training (default: sync)",
    )
    run.add_argument(
        "--max-staleness",
        type=int,
        default=1,
        metavar="S",
        help="async mode: samples are trained at most S policy versions after the one "
        "that generated them (0: on-policy; default 1)",
    )
    run.add_argument(
        "--placement",
        choices=("auto", "colocate", "disaggregate"),
        default="auto",
        help="colocate: every worker hosts a share of every operator; disaggregate: trainers "
        "get worker processes of their own; auto: colocate in sync mode, disaggregate in "
        "async mode (stages then run at the same time)",
    )
    run.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads per operator replica (default 1; a node's resources "
        "{'threads': N} overrides it)",
    )
    run.add_argument("--steps", type=int, help="training steps (default: the workflow's)")
    run.add_argument("--seed", type=int, help="run seed (default: the workflow's)")
    run.add_argument(
        "--run-dir", type=Path, help="where metrics and weights go (default: runs/NAME-TIME)"
    )
    run.add_argument(
        "--scheduler",
        help="address of an existing Dask scheduler (tcp://HOST:PORT); default: start our own",
    )
    run.add_argument("--workers", type=int, default=2, help="embedded cluster worker processes")
    run.add_argument(
        "--host", default="127.0.0.1", help="interface the embedded cluster binds (localhost)"
    )
    _add_overrides(run)
    observe_commands.add_run_options(run)  # --progress, --no-dashboard-page
    record_commands.add_run_options(run)  # --no-record, --record-cap
    run.set_defaults(handler=_cmd_run)

    graph = sub.add_parser("graph", help="print a workflow's validated DAG")
    graph.add_argument("workflow", help=f"workflow name ({names})")
    graph.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of text")
    _add_overrides(graph)
    graph.set_defaults(handler=_cmd_graph)

    observe_commands.add_plot_command(sub)  # asyncflow plot RUN_DIR

    bench = sub.add_parser(
        "bench",
        help="run the quick version of every benchmark, print one table (repo checkout only)",
        add_help=False,  # --help goes to the benchmarks' own parser
    )
    bench.set_defaults(handler=_cmd_bench)
    record_commands.add_commands(sub)  # asyncflow replay, asyncflow inspect
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a workflow config field, e.g. --set lr=1e-4 --set kl_coef=0.01",
    )


def _config(args: argparse.Namespace):
    entry = lookup(args.workflow)
    overrides = _parse_overrides(entry.config_type, args.overrides)
    for flag in ("steps", "seed"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    resume = getattr(args, "resume", None)
    if resume is not None:
        saved = resume / "config.json"
        if not saved.exists():
            raise ConfigError(f"--resume {resume}: no config.json there (not a run directory?)")
        base = _from_dict(entry.config_type, json.loads(saved.read_text()))
        return entry, dataclasses.replace(base, **overrides)
    return entry, entry.config_type(**overrides)


def _from_dict(config_type: type, data: dict):
    """Rebuild a (nested) config dataclass from its saved JSON."""
    hints = typing.get_type_hints(config_type)
    kwargs = {}
    for f in dataclasses.fields(config_type):
        if f.name not in data:
            continue
        value, kind = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = _from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return config_type(**kwargs)


def _parse_overrides(config_type: type, pairs: list[str]) -> dict:
    hints = typing.get_type_hints(config_type)
    fields = {f.name for f in dataclasses.fields(config_type)}
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(
                f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}"
            )
        kind = _settable_type(hints[key])
        if kind is None:
            raise ConfigError(f"--set {key}: field of type {hints[key]} cannot be set here")
        try:
            out[key] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
        except ValueError:
            raise ConfigError(f"--set {key}={raw!r}: not a valid {kind.__name__}") from None
    return out


def _settable_type(hint: object) -> type | None:
    """int/float/str/bool, also behind `X | None`; anything else is not settable from text."""
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return options[0] if len(options) == 1 and options[0] in (int, float, str, bool) else None


def _cmd_bench(args: argparse.Namespace) -> int:
    """`python -m benchmarks` from the checkout this asyncflow was installed from: the
    benchmarks are scripts beside the package, not part of what pip installs."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").exists():
        raise ConfigError(
            f"asyncflow bench: no benchmarks/ beside {root / 'asyncflow'}; it needs a checkout "
            "of the repository (pip install -e .)"
        )
    command = [sys.executable, "-m", "benchmarks", *args.bench_args]
    return subprocess.run(command, cwd=root, check=False).returncode


def _cmd_graph(args: argparse.Namespace) -> int:
    from asyncflow.graph import render_dot, render_text

    entry, cfg = _config(args)
    graph = entry.build(cfg).build()
    print(render_dot(graph) if args.dot else render_text(graph))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from asyncflow.runtime.cluster import ClusterConfig, connect
    from asyncflow.runtime.executor import SyncExecutor
    from asyncflow.runtime.streaming import AsyncExecutor

    entry, cfg = _config(args)
    run_dir = args.resume or args.run_dir
    run_dir = run_dir or Path("runs") / f"{args.workflow}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True, default=str)
    (run_dir / "config.json").write_text(config_json)
    recipe = entry.recipe(cfg, run_dir)
    cluster = ClusterConfig(scheduler=args.scheduler, n_workers=args.workers, host=args.host)
    observers: list = []  # RunObservers chosen by the command line (progress, metrics, ...)
    record_commands.attach(args, run_dir, observers)  # RUN_DIR/record, unless --no-record
    reporter = observe_commands.attach(args, run_dir, cfg.steps, observers)  # page, files
    # through the reporter, so --progress json stays one JSON object per line
    reporter.info(
        f"asyncflow: {args.workflow}, {cfg.steps} steps, {args.mode} mode, run dir {run_dir}"
    )
    with connect(cluster) as client:
        options = {
            "checkpoint_every": args.checkpoint_every,
            "resume": args.resume is not None,
            "config": json.loads(config_json),
            "workflow_name": args.workflow,
            "placement": args.placement,
            "torch_threads": args.torch_threads,
            "observers": observers,
            "reporter": reporter,
        }
        if args.mode == "async":
            executor = AsyncExecutor(
                recipe, client, run_dir, max_staleness=args.max_staleness, **options
            )
        else:
            executor = SyncExecutor(recipe, client, run_dir, **options)
        executor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
