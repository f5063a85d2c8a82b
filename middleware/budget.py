"""A request's time budget, shared by its stages."""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    pass


class Deadline:
    def __init__(self, budget_ms: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_ms / 1000.0

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def remaining_s(self) -> float:
        return max(0.0, self.budget_s - (time.perf_counter() - self.started))

    def wait(self, future: Future[T], reserve_s: float = 0.0) -> T:
        """The future's result, or DeadlineExceeded once the budget (less a reserve) is spent.

        An abandoned future keeps running in its worker: stages must be safe to leave behind.
        """
        try:
            return future.result(timeout=max(0.0, self.remaining_s() - reserve_s))
        except FutureTimeout:
            future.cancel()
            raise DeadlineExceeded("stage ran out of the request's time budget") from None


class Stopwatch:
    """Collects per-stage timings in milliseconds."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def record(self, stage: str, started: float) -> None:
        self.timings[stage] = round((time.perf_counter() - started) * 1000.0, 3)
