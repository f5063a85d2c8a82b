"""Request limits: body size, paging bounds, deadline cap, and the bound on searches in flight."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from middleware import caps
from middleware.config import ServerSettings, Settings
from middleware.schema import SearchRequest
from middleware.server.errors import ApiError

RETRY_AFTER_S = "1"


def check_paging(server: ServerSettings, size: int, from_: int, location: str = "body") -> None:
    if size > server.max_size:
        raise ApiError(400, f"must be at most {server.max_size} (server.max_size)", param="size", location=location)
    if from_ > server.max_from:
        raise ApiError(400, f"must be at most {server.max_from} (server.max_from)", param="from", location=location)


# Below this no retrieval can answer, and the request would fail as if the backend were down (a 503).
MIN_DEADLINE_MS = 50.0


def capped_deadline_ms(
    settings: Settings, requested: float | None, param: str = "deadline_ms", *, refuse_above: bool = True
) -> float:
    """The request's own deadline, or the configured default when it gives none.

    Under MIN_DEADLINE_MS it is the client's error: 400 naming `param`. Above the `max_deadline_ms`
    cap it is a 400 too (`refuse_above`), or is lowered to the cap: the OpenSearch proxy's `timeout`
    is a best-effort bound that OpenSearch clients send as a matter of course (OpenSearch answers
    what it has when it runs out, `timed_out: true`), so the proxy answers within the cap instead.
    """
    if requested is None:
        return min(settings.deadline_ms, settings.max_deadline_ms)
    if requested < MIN_DEADLINE_MS:
        raise ApiError(400, f"must be at least {MIN_DEADLINE_MS:.0f} ms", param=param)
    if requested > settings.max_deadline_ms:
        if not refuse_above:
            return settings.max_deadline_ms
        raise ApiError(
            400, f"must be at most {settings.max_deadline_ms:g} ms (max_deadline_ms), got {requested:g}", param=param
        )
    return requested


def check_caps(settings: Settings, req: SearchRequest, **names: str) -> None:
    """400 naming the parameter and its cap when the request asks for more than a cap allows.

    `names`: field -> the name the client used for it.
    """
    try:
        caps.check(req, settings, names=names)
    except caps.CapExceeded as err:
        raise ApiError(
            400, f"must be at most {err.cap:g} ({err.cap_setting}), got {err.value:g}", param=err.param
        ) from None


class InflightLimiter:
    """At most `capacity` searches at once; the next one is refused at once (429), never queued.

    Used from the event loop only, so a plain counter is enough.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.capacity:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


def queue_full() -> ApiError:
    return ApiError(
        429,
        "too many searches in flight (server.max_queue); retry shortly",
        os_type="rejected_execution_exception",
        headers={"Retry-After": RETRY_AFTER_S},
    )


class RateLimiter:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved up. Keys are bounded
    (the least recently seen are forgotten, which only ever lets a forgotten key start full)."""

    MAX_KEYS = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, n: int) -> float:
        """Spend n tokens of the key's bucket: 0.0 when granted, else the seconds until they would be."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            granted = tokens >= n
            if granted:
                tokens -= n
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self.MAX_KEYS:
                self._buckets.popitem(last=False)
        return 0.0 if granted else (n - tokens) / self.rate
