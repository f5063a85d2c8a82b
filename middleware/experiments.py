"""A/B experiments: variants of the search settings, assigned by a sticky hash of the user or session.

An experiment names its unit ("user": `SearchRequest.user_id`, "session": `session_id`) and two or more
variants, each with a share of the traffic (percentages summing to 100, in steps of 0.01) and an overlay:
the search settings it changes. The first variant is the control the report compares the others with;
its overlay is usually empty.

Assignment: sha256 of the experiment id and the unit id gives a bucket in 0..9999; the variants own
consecutive ranges of buckets by their traffic, in the order given. The same unit always lands in the same
variant while the experiment is unchanged. A search without the unit's id is not exposed: it runs with the
default settings and its response names no experiment.

An overlay may only set what one search can vary: `fusion`, `bm25_weight`, `knn_weight`, `rrf_k`, `rerank`,
`rerank_k`, `reranker` (a name from the `rerankers` setting), `business` (some of the business weights, over
the configured ones) and `rules` (merchandising rules on or off). They become the request's own fields
before the pipeline runs, and they win over what the request itself asked for. A named reranker is loaded
the first time a search needs it, once per process, and it is neither batched nor cached like the
configured one.

Overlap: at most one experiment is active at any moment, whatever its unit (a response names one
experiment). Storing one whose enabled window overlaps another enabled one's is refused; stop (or
disable) the running experiment first. Stopping disables it and ends its window now; it stays stored,
so that its report can still be made.

Storage: `<data_dir>/experiments.json`, written like the merchandising rules (`middleware/rules.py`): an
exclusive lock, a temporary file renamed over the old one, re-read by every process when it changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from middleware.config import BusinessSettings, Settings
from middleware.json_records import JsonRecordStore, ScheduledRecord, first_error
from middleware.schema import SearchRequest, SearchResponse


class ExperimentSearcher(Protocol):
    """What `search` needs of a pipeline (middleware.pipeline.Pipeline is one; it imports this module)."""

    settings: Settings
    experiments: ExperimentStore

    def search(self, req: SearchRequest) -> SearchResponse: ...


log = logging.getLogger(__name__)

BUCKETS = 10_000
MAX_VARIANTS = 10
MAX_EXPERIMENTS = 1000
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
BUSINESS_KEYS = tuple(BusinessSettings.model_fields)


class Overlay(BaseModel):
    """The search settings a variant changes; a key left out keeps the request's (or configured) value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    fusion: Literal["rrf", "minmax"] | None = None
    bm25_weight: float | None = Field(None, ge=0)
    knn_weight: float | None = Field(None, ge=0)
    rrf_k: int | None = Field(None, ge=1, le=10_000)
    rerank: bool | None = None
    rerank_k: int | None = Field(None, ge=0, le=10_000)
    reranker: str | None = Field(None, min_length=1, max_length=128)
    business: dict[str, Any] | None = None
    rules: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    allowed = ", ".join(cls.model_fields)
                    raise ValueError(f"unknown overlay key {key!r} (an overlay may set: {allowed})")
        return data

    @field_validator("business")
    @classmethod
    def _business(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        for key in value:
            if key not in BUSINESS_KEYS:
                raise ValueError(f"unknown business key {key!r} (business weights: {', '.join(BUSINESS_KEYS)})")
        try:
            BusinessSettings.model_validate({**BusinessSettings().model_dump(), **value})
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        return value

    def request_fields(self, base: BusinessSettings) -> dict[str, Any]:
        """The SearchRequest fields this overlay sets; `base`: the business weights it starts from."""
        fields = self.model_dump(exclude_none=True, exclude={"business"})
        if self.business:
            fields["business"] = BusinessSettings.model_validate({**base.model_dump(), **self.business})
        return fields


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    traffic: float = Field(gt=0, le=100, description="percent of the units, in steps of 0.01")
    overlay: Overlay = Field(default_factory=Overlay)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not VARIANT_NAME.match(value):
            raise ValueError("must be 1-64 characters: letters, digits and . _ : - (starting with a letter or digit)")
        return value

    @field_validator("traffic")
    @classmethod
    def _step(cls, value: float) -> float:
        if abs(value * 100 - round(value * 100)) > 1e-6:
            raise ValueError("must be a multiple of 0.01 (percent)")
        return value


class Experiment(ScheduledRecord):
    """One A/B test. Datetimes without a zone are UTC."""

    unit: Literal["user", "session"] = "user"
    variants: list[Variant] = Field(min_length=2, max_length=MAX_VARIANTS)

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variants: two variants share a name")
        total = sum(round(v.traffic * 100) for v in self.variants)
        if total != BUCKETS:
            raise ValueError(f"variants: traffic must sum to 100, got {total / 100:g}")
        return self

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def overlaps(self, other: Experiment) -> bool:
        """Whether both are enabled and their windows share a moment (an open end is unbounded)."""
        if not (self.enabled and other.enabled):
            return False
        return _before(self.active_from, other.active_until) and _before(other.active_from, self.active_until)

    def unit_id(self, req: SearchRequest) -> str | None:
        return req.user_id if self.unit == "user" else req.session_id

    def variant_for(self, unit_id: str) -> Variant:
        """The variant whose bucket range holds the unit's bucket."""
        b = bucket(self.id, unit_id)
        edge = 0
        for variant in self.variants:
            edge += round(variant.traffic * 100)
            if b < edge:
                return variant
        return self.variants[-1]

    def check_settings(self, settings: Settings) -> None:
        """Raise ValueError (naming the field) for an overlay these settings cannot serve."""
        for i, variant in enumerate(self.variants):
            overlay = variant.overlay
            where = f"variants.{i}.overlay"
            if overlay.reranker is not None and overlay.reranker not in settings.rerankers:
                known = ", ".join(sorted(settings.rerankers)) or "none configured"
                raise ValueError(f"{where}.reranker: {overlay.reranker!r} is not a named reranker ({known})")
            if overlay.rerank_k is not None and overlay.rerank_k > settings.max_rerank_k:
                raise ValueError(f"{where}.rerank_k: must be at most {settings.max_rerank_k} (max_rerank_k)")


def _before(start: datetime | None, end: datetime | None) -> bool:
    """Whether a window starting at `start` begins before one ending at `end` ends (None: unbounded)."""
    return start is None or end is None or start < end


def bucket(experiment_id: str, unit_id: str) -> int:
    """0..9999 from sha256 of the experiment id and the unit id: stable across processes and restarts."""
    digest = hashlib.sha256(f"{experiment_id}\x00{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def experiment_error(err: ValidationError) -> tuple[str, str]:
    """(field, message) of an experiment's first validation error: `variants.1.overlay.rrf_k`, …"""
    return first_error(err, "experiment")


# ------------------------------------------------------------------------------------------- storage


class ExperimentStore(JsonRecordStore[Experiment]):
    """Experiments in one JSON file (`{"experiments": [...]}`), re-read when the file changes."""

    key = "experiments"
    model = Experiment
    dump_options: ClassVar[dict[str, Any]] = {"exclude_none": True}

    def active(self, now: datetime | None = None) -> Experiment | None:
        """The experiment running now; None when none is, or when the file cannot be read (searches go on
        with the default settings, and the failure is logged)."""
        moment = now or datetime.now(UTC)
        try:
            return next((e for e in self.all() if e.active(moment)), None)
        except (OSError, ValueError) as err:
            log.warning("experiments off: %s cannot be read: %s", self.path, str(err).splitlines()[0][:300])
            return None

    def put(self, experiment: Experiment) -> None:
        """Insert or replace by id. ValueError when it would overlap another enabled experiment."""
        with self._writing() as current:
            for other in current.values():
                if other.id != experiment.id and experiment.overlaps(other):
                    raise ValueError(
                        f"active_from: overlaps experiment {other.id!r}, which is enabled over the same time "
                        "(at most one experiment runs at a time: stop it first)"
                    )
            current[experiment.id] = experiment
            if len(current) > MAX_EXPERIMENTS:
                raise ValueError(f"at most {MAX_EXPERIMENTS} experiments")

    def stop(self, experiment_id: str, now: datetime | None = None) -> Experiment | None:
        """Disable it and end its window now (an earlier end stays); None when there is no such experiment."""
        moment = now or datetime.now(UTC)
        with self._writing() as current:
            found = current.get(experiment_id)
            if found is None:
                return None
            update: dict[str, Any] = {"enabled": False}
            running = found.active_until is None or found.active_until > moment
            if running and (found.active_from is None or found.active_from < moment):  # begun: it ends now
                update["active_until"] = moment
            stopped = found.model_copy(update=update)
            current[experiment_id] = stopped
        return stopped


def experiments_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / "experiments.json"


# -------------------------------------------------------------------------------------------- exposure


@dataclass(frozen=True)
class Exposure:
    experiment: str
    variant: str


def expose(active: Experiment | None, req: SearchRequest, settings: Settings) -> tuple[SearchRequest, Exposure | None]:
    """The request with its variant's overlay applied and its exposure attached (the pipeline's response
    names it), and the exposure; unchanged and None when no experiment is active or the request lacks
    the experiment's unit id."""
    if active is None:
        return req, None
    unit_id = active.unit_id(req)
    if unit_id is None:
        return req, None
    variant = active.variant_for(unit_id)
    fields = variant.overlay.request_fields(req.business or settings.business)
    exposure = Exposure(active.id, variant.name)
    overlaid = req.model_copy(update=fields)
    overlaid._exposure = exposure  # the pipeline names it in the response, where the query log reads it
    return overlaid, exposure


def search(pipeline: ExperimentSearcher, req: SearchRequest, now: datetime | None = None) -> SearchResponse:
    """The library's search inside experiments: the active experiment of the pipeline's data directory
    assigns the request's unit a variant, the overlay applies, and the response names the exposure."""
    active = pipeline.experiments.active(now)
    overlaid, _ = expose(active, req, pipeline.settings)
    return pipeline.search(overlaid)


def load_experiments(path: Path | str) -> list[Experiment]:
    """Experiments from a JSON file: one object, or a list of them (`shopsearch ab create FILE`)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    items: Sequence[Any] = data if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"[{i}]: an experiment is a JSON object")
        out.append(Experiment.model_validate(item))
    return out
