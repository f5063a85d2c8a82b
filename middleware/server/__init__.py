"""The HTTP service (`shopsearch serve`): REST API, OpenSearch-compatible proxy, batching, caches, metrics.

Library use needs none of this: the same pipeline is importable, sync and async::

    from middleware.config import Settings
    from middleware.pipeline import Pipeline
    from middleware.schema import SearchRequest

    pipeline = Pipeline.from_settings(Settings())
    response = pipeline.search(SearchRequest(query="送女友的轻奢小众手表", size=10))
    response = await pipeline.asearch(SearchRequest(query="..."))  # inside async code

To serve: `create_app(settings)` (or `create_app(settings, pipeline)` to reuse a loaded pipeline).
"""

from middleware.server.app import create_app

__all__ = ["create_app"]
