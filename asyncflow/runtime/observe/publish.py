"""DashboardPublisher: carries a run's LiveState to the scheduler, about once a second.

The driver is not the scheduler's process (except on our embedded cluster), so the page
cannot read the run directly. The publisher's own thread takes `LiveState.take_delta()`
(gauges plus what was appended since the last push) and sends it in one RPC to the
scheduler extension (`dashboard.py`); the executor's threads never wait for it. The
first push installs the extension if the scheduler lacks it and sends the run's header;
the run's operators also get Dask spans (`spans.py`), unless `spans=False`.

A failing scheduler connection is logged once and retried at the next tick; the run
never stops because of the dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from asyncflow.runtime.events import RunInfo, RunObserver
from asyncflow.runtime.observe import page_url
from asyncflow.runtime.observe.live import LiveState

logger = logging.getLogger(__name__)


class DashboardPublisher(RunObserver):
    """Pushes `live` to the scheduler every `interval` seconds and at the end.

    client: a synchronous distributed.Client to the run's scheduler; by default the
    current client if it talks to that scheduler, else a new one (closed at the end).
    say: where to print the page's address (e.g. `RunReporter.info`); None: nowhere.
    """

    def __init__(
        self,
        live: LiveState,
        *,
        client: Any = None,
        interval: float = 1.0,
        spans: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.live = live
        self.interval = interval
        self.spans = spans
        self.say = say
        self.url: str | None = None
        self.pushes = 0
        self.push_seconds = 0.0  # wall time spent pushing (the publisher's own thread)
        self.span_ids: dict[str, str] = {}
        self._client = client
        self._own_client = False
        self._info: RunInfo | None = None
        self._started = False  # the board has our header
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self._connected = False  # the scheduler has our extension (and spans, if asked)
        self._ready = threading.Event()  # set once connecting succeeded or failed

    # -- hooks --------------------------------------------------------------------------

    def run_started(self, info: RunInfo) -> None:
        self._info = info
        self.url = page_url(info.dashboard)
        if self.url and self.say is not None:
            self.say(f"asyncflow page: {self.url}")
        self._thread = threading.Thread(target=self._loop, name="asyncflow-publish", daemon=True)
        self._thread.start()

    def run_finished(self, summary: dict[str, Any]) -> None:
        """Last push (the live state already holds the summary), then tidy up."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        client = self._client
        if self._info is not None and self._connected:
            self.push()
            if self.span_ids:
                from asyncflow.runtime.observe.spans import close_spans

                close_spans(client)
        if self._own_client and client is not None:
            client.close()

    # -- pushing ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._connect()
            self._connected = True
        except Exception:
            logger.warning("asyncflow: dashboard page not available", exc_info=True)
            return
        finally:
            self._ready.set()
        while not self._stop.is_set():
            self.push()
            self._stop.wait(self.interval)

    def _connect(self) -> None:
        from asyncflow.runtime.observe.dashboard import install

        info = self._info
        assert info is not None
        if self._client is None:
            from distributed import Client, default_client

            try:
                current = default_client()
            except ValueError:
                current = None
            if current is not None and current.scheduler.address == info.scheduler:
                self._client = current
            else:
                self._client = Client(info.scheduler, set_as_default=False)
                self._own_client = True
        install(self._client)
        if self.spans:
            from asyncflow.runtime.observe.spans import open_spans

            self.span_ids = open_spans(
                self._client, self.live.header.get("workflow", "run"), list(info.graph.order())
            )

    def push(self) -> bool:
        """Send what changed now (thread-safe; also called at the end). False on failure."""
        if not self._ready.wait(timeout=60) or not self._connected:
            return False  # still connecting after a minute, or the page is not available
        client = self._client
        with self._push_lock:
            delta: dict[str, Any] = {}
            start = time.perf_counter()
            try:
                delta = self.live.take_delta(self.live.queue_stats())
                if not self._started:
                    client.sync(client.scheduler.asyncflow_observe_start, header=self.live.header)
                    self._started = True
                known = client.sync(
                    client.scheduler.asyncflow_observe_update, run_id=self.live.run_id, delta=delta
                )
                if not known:  # the scheduler lost our header (restarted): send it again
                    client.sync(client.scheduler.asyncflow_observe_start, header=self.live.header)
                    client.sync(
                        client.scheduler.asyncflow_observe_update,
                        run_id=self.live.run_id,
                        delta=delta,
                    )
                self.pushes += 1
                self._failed = False
                return True
            except Exception:
                self.live.give_back(delta)  # its steps and segments go with the next push
                if not self._failed:
                    logger.warning("asyncflow: could not update the dashboard page", exc_info=True)
                self._failed = True
                return False
            finally:
                self.push_seconds += time.perf_counter() - start
