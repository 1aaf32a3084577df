"""The /asyncflow page in a real headless browser (Debian's chromium), during a real run.

The run waits after its second step while chromium renders the page (its scripts draw
everything from the run's JSON), dumps the resulting DOM and saves a screenshot. Needs
chromium: `scripts/install_chromium.sh` installs it; without it the test is skipped.
Set ASYNCFLOW_SCREENSHOT=path.png to keep the screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from asyncflow.runtime.events import RunObserver
from asyncflow.runtime.observe.live import LiveState
from asyncflow.runtime.observe.publish import DashboardPublisher
from asyncflow.runtime.streaming import AsyncExecutor
from asyncflow.workflows import grpo

pytestmark = pytest.mark.cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SMALL = grpo.GRPOConfig(steps=4, prompts_per_step=8, group_size=4, warmstart_steps=20)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=4000",  # let the page's scripts run (and poll once)
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


class Pause(RunObserver):
    """Holds the run after step `step` until the browser is done (or 120 s pass)."""

    def __init__(self, publisher: DashboardPublisher, step: int):
        self.publisher, self.step = publisher, step
        self.reached, self.resume = threading.Event(), threading.Event()

    def step_finished(self, record):
        if record["step"] == self.step:
            self.publisher.push()
            self.reached.set()
            self.resume.wait(120)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (run scripts/install_chromium.sh)"
)
def test_page_renders_in_headless_chromium_during_a_run(dask_client, tmp_path):
    live = LiveState()
    publisher = DashboardPublisher(live)
    pause = Pause(publisher, step=1)
    executor = AsyncExecutor(
        grpo.recipe(replace(SMALL), tmp_path / "run"),
        dask_client,
        tmp_path / "run",
        max_staleness=1,
        observers=[live, publisher, pause],
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            executor.run()
        except BaseException as exc:
            errors.append(exc)
            pause.reached.set()

    thread = threading.Thread(target=run, name="run")
    thread.start()
    try:
        assert pause.reached.wait(180), "the run never finished its second step"
        assert not errors, errors
        url = publisher.url
        screenshot = Path(os.environ.get("ASYNCFLOW_SCREENSHOT", tmp_path / "asyncflow.png"))
        shot = chromium(
            tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1400,1000", url
        )
        dom = chromium(tmp_path / "profile", "--dump-dom", url)
    finally:
        pause.resume.set()
        thread.join(timeout=180)
    assert not errors, errors
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a drawn page, not a blank one
    html = dom.stdout
    assert 'data-status="running"' in html  # rendered while the run was paused mid-way
    assert "step 2/4" in html
    for name in ("prompts", "rollout", "reward", "advantage", "actor"):
        assert f'data-op="{name}"' in html  # a DAG node and a table row per operator
    assert 'class="seg"' in html  # timeline segments drawn
    assert 'class="series"' in html  # curves drawn
    # samples trained when the page was drawn: two finished steps (async mode: the trainer
    # may already be on the next ones while the run's step bookkeeping waits)
    trained = int(re.search(r'id="trained"[^>]*>(\d+)<', html).group(1))
    assert trained >= 2 * 32
