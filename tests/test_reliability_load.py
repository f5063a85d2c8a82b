"""Load: the figures come from `python -m benchmarks.reliability --only load` (a bounded loopback run at
about 2× capacity). What a test can hold fast is the cause of the stalls that run found."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from benchmarks.reliability.common import make_app, service_settings
from tests.test_server_support import server_models, server_store

__all__ = ["server_models", "server_store"]


def test_service_freezes_startup_objects_out_of_the_collector(server_store, server_models) -> None:
    """Regression: full collections walked every object of the loaded models and libraries and stalled all
    requests 125-300 ms at once under load. Once started, those objects sit in the permanent generation."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with TestClient(make_app(server_store, *server_models, service_settings())) as client:
        assert gc.get_freeze_count() > 10_000  # torch, transformers, onnxruntime, the app: far more than this
        assert client.post("/v1/search", json={"query": "手表"}).status_code == 200
    gc.unfreeze()  # leave the test process as it was
