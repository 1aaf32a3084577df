"""`python -m benchmarks`: the table it builds from each benchmark's JSON, and how it reports
a benchmark that fails or cannot run. No real benchmark runs here (they live in benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import (  # noqa: E402
    Benchmark,
    render,
    run_one,
    summarize_async_vs_sync,
    summarize_observe,
    summarize_recording,
    summarize_transfer_queue,
    summarize_vs_trl,
)


def test_targets_become_rows_with_their_verdicts():
    data = {"targets": [["sim-16 >= 2.0x", "2.41x", True], ["sim-64 >= 2.0x", "1.86x", False]]}
    rows = summarize_async_vs_sync(data)
    assert [(r.metric, r.asyncflow, r.met) for r in rows] == [
        ("sim-16 >= 2.0x", "2.41x", "PASS"),
        ("sim-64 >= 2.0x", "1.86x", "MISS"),
    ]


def test_transfer_queue_ratios_against_the_package_and_its_own_targets():
    data = {
        "put_small_client_gibs_best": 3.6,
        "get_small_cross_gibs_best": 3.7,
        "transferqueue_put_gibs_best": 0.9,
        "transferqueue_get_gibs_best": 0.33,
        "transferqueue_put_ratio_ours": 4.0,
        "transferqueue_get_ratio_ours": 11.2,
        "targets": [["get >= 60% of TCP", "80%", "PASS"], ["no row twice", "violated", "FAIL"]],
    }
    rows = summarize_transfer_queue(data)
    assert [(r.asyncflow, r.baseline, r.ratio) for r in rows[:2]] == [
        ("3.60", "0.90", "4.00x"),
        ("3.70", "0.33", "11.20x"),
    ]
    assert [r.met for r in rows[2:]] == ["PASS", "FAIL"]
    skipped = summarize_transfer_queue({"transferqueue": "transferqueue: not installed"})
    assert skipped[0].met == "SKIPPED"


def test_vs_trl_compares_with_the_named_baseline():
    system = {"samples_per_s": 100.0, "reward_mean": 0.5}
    data = {
        "baseline": "trl_1t",
        "systems": {
            "trl_1t": {"samples_per_s": 200.0, "reward_mean": 0.52},
            "asyncflow_sync": system,
        },
        "targets": {
            "asyncflow_sync": {
                "speedup": 0.5,
                "speed_pass": False,
                "reward_tolerance": 0.01,
                "reward_pass": False,
            }
        },
    }
    speed, reward = summarize_vs_trl(data)
    assert (speed.asyncflow, speed.baseline, speed.ratio, speed.met) == (
        "100.0",
        "200.0",
        "0.50x",
        "MISS",
    )
    assert "trl_1t" in speed.metric and reward.met == "MISS"


def test_overhead_benchmarks_pass_within_their_budgets():
    observe = {"ratio": 0.975, "median_samples_per_s": {"on": 975, "off": 1000}, "cpu_ratio": 1.01}
    assert summarize_observe(observe)[0].met == "PASS"
    assert summarize_observe({**observe, "ratio": 0.96})[0].met == "MISS"
    assert summarize_recording({"throughput_ratio": 0.951})[0].met == "PASS"
    assert summarize_recording({"throughput_ratio": 0.94})[0].met == "MISS"


def test_a_failing_benchmark_is_reported_with_its_stderr(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys\nsys.stderr.write('boom: no cores left\\n')\nsys.exit(3)\n")
    rows, result = run_one(Benchmark("broken", str(script), summarize_recording), tmp_path, False)
    assert rows[0].met == "FAILED" and "exit 3" in rows[0].metric and "boom" in rows[0].metric
    assert result["failed"] == 3


def test_a_benchmark_without_its_optional_dependency_is_skipped(tmp_path):
    bench = Benchmark(
        "needs", "x.py", summarize_recording, requires=("no_such_module_xyz",), needs_note="n/a"
    )
    rows, _ = run_one(bench, tmp_path, False)
    assert rows[0].met == "SKIPPED" and "no_such_module_xyz" in rows[0].metric


def test_render_aligns_one_table():
    rows = summarize_recording({"throughput_ratio": 0.99})
    lines = render(rows).splitlines()
    assert lines[0].split(" | ")[0].strip() == "benchmark"
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width


@pytest.mark.parametrize("command", [["-m", "benchmarks", "--help"]])
def test_entry_point_runs(command):
    out = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--only" in out.stdout
