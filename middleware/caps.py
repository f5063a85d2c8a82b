"""Server-side caps on a search request's cost: `retrieve_n`, `rerank_k`, `deadline_ms`.

The caps are settings (`max_retrieve_n`, `max_rerank_k`, `max_deadline_ms`); a request asking for
more is refused with a CapExceeded naming the parameter and the cap, never silently trimmed.
"""

from __future__ import annotations

from middleware.config import Settings
from middleware.schema import SearchRequest


class CapExceeded(ValueError):
    """A request parameter above its configured cap."""

    def __init__(self, param: str, value: float, cap_setting: str, cap: float) -> None:
        self.param, self.value, self.cap_setting, self.cap = param, value, cap_setting, cap
        super().__init__(f"{param} must be at most {cap:g} ({cap_setting}), got {value:g}")


CAPPED: tuple[tuple[str, str], ...] = (
    ("retrieve_n", "max_retrieve_n"),
    ("rerank_k", "max_rerank_k"),
    ("deadline_ms", "max_deadline_ms"),
)


def check(req: SearchRequest, settings: Settings, *, names: dict[str, str] | None = None) -> None:
    """Raise CapExceeded for the first of the request's own values above its cap.

    `names` maps a field to the name the caller knows it by (the proxy's `timeout`).
    """
    for field, cap_setting in CAPPED:
        value = getattr(req, field)
        cap = getattr(settings, cap_setting)
        if value is not None and value > cap:
            raise CapExceeded((names or {}).get(field, field), value, cap_setting, cap)
