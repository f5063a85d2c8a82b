"""Shared pytest fixtures. Keep this file tidy: one section per area, session-scoped where costly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from middleware.backends.base import Backend

# Tests never download: a hub id that is not local fails at once with ModelLoadError.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------ models
# Tiny random-init models from tests.support.tiny_models (built once per session, a second each).
# The embedder directory is named like a bge zh model, so it gets the BGE query instruction by
# default, as the production embedder does.


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BertModel, CLS pooling (no sentence-transformers files), WordPiece tokenizer."""
    from tests.support.tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bge-zh")


@pytest.fixture(scope="session")
def tiny_mean_embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BertModel with sentence-transformers files declaring mean pooling."""
    from tests.support.tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-mean-minilm", pooling="mean")


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny XLMRobertaForSequenceClassification (one logit), Unigram tokenizer."""
    from tests.support.tiny_models import make_tiny_xlmr

    return make_tiny_xlmr(tmp_path_factory.mktemp("models") / "tiny-bge-reranker")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONNX export cache shared by the session's tests (each model is exported once)."""
    return tmp_path_factory.mktemp("model-cache")


# ------------------------------------------------------------------------------------------ stores


@pytest.fixture(params=["embedded", "opensearch"])
def empty_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """An empty store on each backend; the OpenSearch one (two shards) is skipped without a node."""
    if request.param == "embedded":
        from middleware.backends.embedded import EmbeddedBackend

        with EmbeddedBackend(tmp_path / "data") as embedded:
            yield embedded
        return
    from tests.support.stores import SHARDS, throwaway_opensearch

    with throwaway_opensearch(shards=SHARDS) as remote:
        yield remote
