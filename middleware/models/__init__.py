"""Embedding and reranking models: name resolution, ONNX export/cache, onnxruntime or PyTorch.

from middleware.models import Embedder, Reranker
Embedder("BAAI/bge-large-zh-v1.5").encode_queries(["送女友的轻奢小众手表"])
Reranker("BAAI/bge-reranker-v2-m3").rerank(query, docs, top_n=10)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from middleware.models.embedder import BGE_ZH_QUERY_INSTRUCTION, Embedder
from middleware.models.errors import ModelLoadError
from middleware.models.reranker import Reranker

if TYPE_CHECKING:
    from middleware.config import Settings
    from middleware.models.remote import RemoteEmbedder, RemoteReranker

__all__ = [
    "BGE_ZH_QUERY_INSTRUCTION",
    "Embedder",
    "ModelLoadError",
    "Reranker",
    "load_embedder",
    "load_reranker",
]


def load_embedder(settings: Settings) -> Embedder | RemoteEmbedder | None:
    """The embedder the settings describe, or None when `embedder` is "none"."""
    if not settings.embedder_enabled:
        return None
    from middleware.models.remote import is_remote, load_remote_embedder  # httpx only when used

    if is_remote(settings.embedder):  # a model server (OpenAI / TEI API)
        return load_remote_embedder(settings)
    return Embedder(
        settings.embedder,
        runtime=settings.embedder_runtime,
        precision=settings.embedder_precision,
        device=settings.device,
        query_instruction=settings.query_instruction,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        cache_dir=settings.model_cache_dir,
        threads=settings.threads,
        io_binding=settings.onnx_io_binding,
    )


def load_reranker(settings: Settings) -> Reranker | RemoteReranker | None:
    """The reranker the settings describe, or None when `reranker` is "none"."""
    if not settings.reranker_enabled:
        return None
    from middleware.models.remote import is_remote, load_remote_reranker

    if is_remote(settings.reranker):  # a model server (TEI / Cohere API)
        return load_remote_reranker(settings)
    return Reranker(
        settings.reranker,
        precision=settings.reranker_precision,
        device=settings.device,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        cache_dir=settings.model_cache_dir,
        threads=settings.threads,
        io_binding=settings.onnx_io_binding,
    )
