"""Our page on the Dask dashboard: a scheduler extension that keeps the run's board.

- RPC handlers `asyncflow_observe_start` / `asyncflow_observe_update` take the
  driver's pushes (`publish.py`); they only merge dicts, never wait.
- HTTP, on the scheduler's own web server (the dashboard's port): `/asyncflow` (the
  page), `/asyncflow/api/state.json` (the JSON it polls); `asyncflow_*` metrics join
  Dask's `/metrics` (prometheus.py).
- The page is linked from the dashboard's top menu (Bokeh pages opened afterwards).

Installed either up front, `dask scheduler --preload asyncflow.runtime.observe.dashboard`,
or from a client at run start (`install(client)`, idempotent), which works on our
embedded LocalCluster and on any scheduler the user brings.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from asyncflow.runtime.observe import PAGE_PATH, prometheus
from asyncflow.runtime.observe.board import Board
from asyncflow.runtime.observe.page import render_page

logger = logging.getLogger(__name__)

EXTENSION = "asyncflow_observe"
# Extensions in this process; /metrics reports the one updated last (one scheduler per
# process in practice; tests run several, one after the other).
_extensions: weakref.WeakSet[ObserveExtension] = weakref.WeakSet()


class ObserveExtension:
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.board = Board()
        scheduler.handlers.update(
            {
                "asyncflow_observe_start": self.start,
                "asyncflow_observe_update": self.update,
                "asyncflow_observe_view": self.view,
            }
        )
        self.http = add_routes(scheduler, self)
        self.menu = add_menu_link(scheduler)
        self.metrics = prometheus.serve_from(_current_board)
        _extensions.add(self)

    def start(self, header: dict[str, Any]) -> None:
        self.board.start(header)
        logger.info("asyncflow: watching run %s (%s)", header.get("run_id"), header.get("workflow"))

    def update(self, run_id: str, delta: dict[str, Any]) -> bool:
        """Merge a delta; False asks the driver to send its header again (`start`)."""
        return self.board.update(run_id, delta)

    def view(self) -> dict[str, Any]:
        return self.board.view()


def _current_board() -> Board | None:
    live = [e for e in list(_extensions) if e.scheduler.status == Status.running]
    if not live:
        return None
    return max(live, key=lambda e: (e.board.received, e.board.changes)).board


class PageHandler(web.RequestHandler):
    def initialize(self, extension: ObserveExtension) -> None:
        self.extension = extension

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(render_page(self.extension.board.view_json()))


class StateHandler(web.RequestHandler):
    def initialize(self, extension: ObserveExtension) -> None:
        self.extension = extension

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(self.extension.board.view_json())


def add_routes(scheduler: Any, extension: ObserveExtension) -> bool:
    """Add the page and its JSON to the scheduler's web server, if it has one."""
    app = getattr(scheduler, "http_application", None)
    if app is None:
        return False
    prefix = "/" + (getattr(scheduler, "http_prefix", None) or "").strip("/")
    base = (prefix.rstrip("/") + "/" + PAGE_PATH).replace("//", "/")
    kwargs = {"extension": extension}
    app.add_handlers(
        r".*",
        [
            (rf"{base}", PageHandler, kwargs),
            (rf"{base}/", web.RedirectHandler, {"url": base}),  # keeps relative links right
            (rf"{base}/api/state\.json", StateHandler, kwargs),
        ],
    )
    return True


def add_menu_link(scheduler: Any) -> bool:
    """Put "Asyncflow" in the dashboard's top menu (pages rendered from now on)."""
    try:
        from distributed.dashboard.scheduler import template_variables
    except ImportError:  # no bokeh: no dashboard pages to link from
        return False
    try:
        pages = template_variables(scheduler)["pages"]
    except Exception:  # the dashboard's internals changed: the page still works
        logger.debug("asyncflow: could not add the menu link", exc_info=True)
        return False
    if PAGE_PATH not in pages:
        pages.append(PAGE_PATH)
    return True


class ObserveSchedulerPlugin(SchedulerPlugin):
    """Installs the extension once; registering it again is a no-op (idempotent)."""

    name = "asyncflow-observe"
    idempotent = True

    async def start(self, scheduler: Any) -> None:
        if EXTENSION not in scheduler.extensions:
            scheduler.extensions[EXTENSION] = ObserveExtension(scheduler)


def install(client: Any) -> None:
    """Register the plugin from a (synchronous) client; harmless when already there."""
    client.register_plugin(ObserveSchedulerPlugin())


def dask_setup(scheduler: Any) -> None:
    """`dask scheduler --preload asyncflow.runtime.observe.dashboard` installs it up front."""
    scheduler.add_plugin(ObserveSchedulerPlugin())
