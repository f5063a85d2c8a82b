"""Loading a server's service in the background, retried until it loads.

Every server that loads models uses `BackgroundLoader` (models-only and the full service, one per
`serve --workers` process), so readiness reads the same everywhere: false with the reason while
loading, true once loaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from middleware.server.errors import redact

log = logging.getLogger(__name__)
S = TypeVar("S")

# how long a failed load waits before the next try (doubling up to the cap)
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


class BackgroundLoader(Generic[S]):
    """Builds a service with `build`, retrying with backoff; `error` holds the last failure's line."""

    def __init__(self, build: Callable[[], S], what: str) -> None:
        self.build = build
        self.what = what  # for the log: "models", "the service"
        self.error: str | None = None
        self.attempts = 0

    async def load(self) -> S:
        delay = RETRY_FIRST_S
        while True:
            self.attempts += 1
            try:
                return await asyncio.to_thread(self.build)
            except Exception as err:
                self.error = " ".join(redact(str(err)).split())[:500] or type(err).__name__
                log.error("%s not loaded (try %d, next in %.0f s): %s", self.what, self.attempts, delay, self.error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
