"""Library use, as documented for storefront backends: the pipeline without the HTTP service, sync and async."""

from __future__ import annotations

import asyncio

from middleware.cli.search import load_demo_catalog
from middleware.config import Settings
from middleware.pipeline import Pipeline
from middleware.schema import SearchRequest


def test_pipeline_from_settings_sync_and_async(tiny_embedder_dir, tiny_reranker_dir, model_cache_dir, tmp_path):
    settings = Settings(
        data_dir=tmp_path / "store",
        embedder=str(tiny_embedder_dir),
        reranker=str(tiny_reranker_dir),
        reranker_precision="fp32",
        model_cache_dir=model_cache_dir,
    )
    pipeline = Pipeline.from_settings(settings)
    try:
        products = load_demo_catalog(None)
        assert pipeline.embedder is not None
        pipeline.backend.upsert(products, pipeline.embedder.encode_documents([p.embedding_text() for p in products]))

        sync = pipeline.search(SearchRequest(query="适合送女友的轻奢小众手表", size=5))
        assert len(sync.hits) == 5 and sync.degraded == [] and sync.reranked > 0

        async def storefront_handler() -> list[str]:
            responses = await asyncio.gather(
                pipeline.asearch(SearchRequest(query="适合送女友的轻奢小众手表", size=5)),
                pipeline.asearch(SearchRequest(query="蓝牙耳机", size=3)),
            )
            return [h.id for h in responses[0].hits] + ["|"] + [h.id for h in responses[1].hits]

        ids = asyncio.run(storefront_handler())
        assert ids[:5] == [h.id for h in sync.hits]  # same ranking from the async entry point
        assert len(ids) == 9
    finally:
        pipeline.close()
