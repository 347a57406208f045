"""What a director shows beyond the bus: the operator page, TensorBoard curves, model.json.

The round driver (node.director) reports three things and nothing else, whatever is
configured: its status whenever it is written, each round's record once it is checkpointed,
and, when it starts, the records a resumed federation already has. From those:

* the live operator page (`[ui] bind`, node.ui): a `MemoryFeed` the page reads, served by
  uvicorn as a task in the director's own event loop; its address goes into status.json
  (``ui_url``) and the log;
* TensorBoard event files (`[tracking] tensorboard`, node.tracking), one event per round;
  on resume at round r the tracker marks a restart at r, so a round logged but never
  checkpointed is not shown twice;
* ``model.json`` (node.export.write_model_spec), written at start, so `fedbus export` works
  on the state folder alone.

Neither the page nor the tracker may stop the federation: a tracker that cannot write logs a
warning; only a page that cannot start (address in use, a bind policy violation) is an error,
raised before the first round.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from node.config import DirectorConfig
from node.logs import get_logger
from node.ui.feed import MemoryFeed

__all__ = ["Monitor"]


class Monitor:
    """The director's observers (see the module docstring); `start()`, then `close()`."""

    def __init__(self, cfg: DirectorConfig) -> None:
        self.cfg = cfg
        self.feed = MemoryFeed()
        self.log = get_logger()
        self.url: str | None = None
        self._tracker: Any = None
        self._page: Any = None
        self._serving: asyncio.Task[None] | None = None

    async def start(self, records: Sequence[Mapping[str, Any]], first_round: int) -> None:
        from node.export import write_model_spec

        write_model_spec(self.cfg.state_dir, self.cfg.model)
        self.feed.replace_records(records)
        if self.cfg.tracking.tensorboard:
            from node.tracking import RoundTracker

            self._tracker = RoundTracker(
                self.cfg.tracking.tensorboard, resume_from=first_round if records else None
            )
        if self.cfg.ui is not None:
            await self._serve()

    async def _serve(self) -> None:
        from node.ui.server import OperatorPage

        assert self.cfg.ui is not None
        page = OperatorPage(self.feed, self.cfg.ui)  # the bind policy is checked here
        self._page = page
        self._serving = asyncio.create_task(page.serve())
        while not page.started and not self._serving.done():
            await asyncio.sleep(0.02)
        if self._serving.done():
            self._serving.result()  # raises why the page did not start
        host = self.cfg.ui.bind.rsplit(":", 1)[0]
        self.url = f"{page.scheme}://{host}:{page.port}/"
        self.log.info("operator_page", url=self.url)

    def status_fields(self) -> dict[str, Any]:
        """What the status adds about these observers."""
        return {"ui_url": self.url} if self.url else {}

    def publish_status(self, status: Mapping[str, Any]) -> None:
        self.feed.publish_status(status)

    def publish_record(self, record: Mapping[str, Any]) -> None:
        self.feed.publish_record(record)
        if self._tracker is not None:
            try:
                self._tracker.log_round(record)
            except OSError as exc:  # curves are for people; the federation goes on
                self.log.warning("tracking_failed", reason=str(exc))

    async def close(self) -> None:
        if self._page is not None:
            self._page.stop()
        if self._serving is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._serving, 10)
        if self._tracker is not None:
            with contextlib.suppress(OSError):
                self._tracker.close()
