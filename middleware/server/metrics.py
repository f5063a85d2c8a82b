"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shopsearch_requests_total",
            "HTTP requests answered, by route group, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "shopsearch_request_seconds",
            "HTTP request latency by route group",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "shopsearch_stage_seconds",
            "Query pipeline stage latency (embed, retrieve, fuse, rerank, business)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "shopsearch_batch_size",
            "Items per model call (query embeddings or rerank pairs)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "shopsearch_batch_seconds",
            "Model time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "shopsearch_cache_lookups_total",
            "Cache lookups by cache and result (hit/miss)",
            ["cache", "result"],
            registry=r,
        )
        self.degraded = Counter(
            "shopsearch_degraded_total",
            "Answers given without a stage (failed or out of budget), by stage",
            ["stage"],
            registry=r,
        )
        self.rejected = Counter(
            "shopsearch_rejected_total",
            "Requests refused before running, by reason",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge("shopsearch_searches_in_flight", "Searches running now", registry=r)
        self.passthrough = Counter(
            "shopsearch_passthrough_total",
            "Proxy requests passed to the upstream OpenSearch, by outcome",
            ["outcome"],
            registry=r,
        )

        self.events = Counter(
            "shopsearch_events_total",
            "Events taken in by POST /v1/events: trusted, or the reason they are not",
            ["trust"],
            registry=r,
        )
        self.query_log = Gauge(
            "shopsearch_query_log_records",
            "Searches sent to the query log since start: logged, dropped (queue full), failed (not stored)",
            ["outcome"],
            registry=r,
        )

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    def observe_cache(self, cache: str, hit: bool) -> None:
        self.cache_lookups.labels(cache, "hit" if hit else "miss").inc()

    def observe_search(self, timings_ms: dict[str, float], degraded: list[str]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1000.0)
        for stage in degraded:
            self.degraded.labels(stage).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
