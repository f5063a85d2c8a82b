"""One configuration model for the library, the CLI and the server.

Values come from (highest first): explicit keyword arguments, environment variables
`SHOPSEARCH_*` (nested with `__`, e.g. `SHOPSEARCH_OPENSEARCH__URL`), a TOML/YAML file named
by `SHOPSEARCH_CONFIG` or passed to `Settings.from_file`, then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

DEFAULT_EMBEDDER = "BAAI/bge-large-zh-v1.5"
DEFAULT_RERANKER = "BAAI/bge-reranker-v2-m3"


def default_model_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shopsearch" / "models"


class FusionSettings(BaseModel):
    """How the lexical and vector lists merge. The defaults are the configuration that came out best,
    or within a hair of the best, on every evaluation set and pool measured with all-MiniLM-L6-v2
    (benchmarks/results/FUSION.md); with another embedder, measure your own with `shopsearch tune fusion`."""

    method: Literal["rrf", "minmax"] = "minmax"
    rrf_k: int = Field(60, ge=1)
    # weighted RRF: fused = rrf_bm25_weight / (k + bm25 rank) + rrf_knn_weight / (k + knn rank)
    rrf_bm25_weight: float = Field(1.0, ge=0)
    rrf_knn_weight: float = Field(1.0, ge=0)
    # min-max weighted sum: final = bm25_weight * norm(bm25) + knn_weight * norm(knn)
    bm25_weight: float = Field(0.8, ge=0)
    knn_weight: float = Field(0.2, ge=0)


class BusinessSettings(BaseModel):
    """Relevance first: final = relevance + sales_bonus - stock_penalty (`middleware/business.py`).

    Relevance lies on a 0–1 scale (the reranker's probability, or the retrievals' scores normalised
    per query). Products whose relevance differs by less than `margin` are comparable: among them the
    sales bonus decides, and it never lifts a product above one that is `margin` or more more relevant.
    """

    model_config = ConfigDict(extra="forbid")

    # relevance gap (0–1 scale) under which two products count as comparable; the sales bonus spans it
    margin: float = Field(0.05, ge=0, le=1)
    # share of the margin the sales bonus may use: bonus = margin · w_sales · smoothed sales term
    w_sales: float = Field(1.0, ge=0, le=1)
    # pseudo-sales added to every product before the log: small counts are noise, new products not buried
    sales_prior: float = Field(10.0, ge=0)
    # out-of-stock penalty in margins; at 2 or more an out-of-stock product falls below every in-stock
    # product of comparable relevance, whatever the sales
    out_of_stock_penalty: float = Field(3.0, ge=0)
    out_of_stock: Literal["demote", "filter"] = "demote"


class KnnFloorSettings(BaseModel):
    """A vector hit matches when its similarity is at least max(absolute, relative × the query's best).
    None: the value calibrated for the configured embedder (middleware.paging.CALIBRATED_FLOORS)."""

    relative: float | None = Field(None, ge=0, le=1)
    absolute: float | None = Field(None, ge=-1, le=1)


class OpenSearchSettings(BaseModel):
    url: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["http://localhost:9200"])
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    verify_certs: bool = True
    ca_certs: Path | None = None
    timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(3, ge=0)
    index_prefix: str = "products"  # versioned indexes products-v<N>, aliases products / products-write
    read_alias: str | None = None
    write_alias: str | None = None
    # retrieval: "client" fuses two queries in the middleware; "hybrid" uses a search pipeline
    retrieval: Literal["client", "hybrid"] = "client"
    hybrid_normalization: Literal["min_max", "l2", "z_score", "rrf"] = "min_max"
    search_pipeline: str = "shopsearch-hybrid"
    word_analyzer: Literal["auto", "smartcn", "ik_smart", "standard"] = "auto"
    hnsw_m: int = Field(16, ge=2)
    hnsw_ef_construction: int = Field(128, ge=2)
    hnsw_ef_search: int = Field(100, ge=2)
    # k-NN engine of the vector field: faiss (native, as in docker-compose) or lucene (pure-Java HNSW,
    # for clusters without the faiss natives, such as the Maven-built test node)
    knn_engine: Literal["faiss", "lucene"] = "faiss"
    vector_compression: Literal["none", "fp16"] = "none"
    vector_mode: Literal["in_memory", "on_disk"] = "in_memory"
    shards: int = Field(1, ge=1)
    replicas: int = Field(1, ge=0)
    refresh_interval: str = "1s"  # restored after a bulk build (which runs with -1)
    # "false": writes become visible on the next refresh; "wait_for": each write call waits for it
    write_refresh: Literal["false", "wait_for", "true"] = "false"
    bulk_chunk_size: int = Field(500, ge=1)
    bulk_max_retries: int = Field(5, ge=0)  # per chunk, on 429 (rejected: queue full)
    bulk_initial_backoff_s: float = Field(2.0, gt=0)  # doubles on each 429 retry

    @field_validator("url", mode="before")
    @classmethod
    def _split_urls(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)  # processes sharing the port (serve --workers)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # env: comma-separated
    api_keys_file: Path | None = None
    index_name: str = "products"  # index name the proxy answers for with the embedded backend
    allowed_indices: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["products*"])
    enable_writes: bool = False  # product upsert/delete endpoints and proxy write routes
    upstream_url: str | None = None  # OpenSearch to pass non-text queries through to
    upstream_verify_certs: bool = True
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_query_chars: int = Field(512, ge=1)  # longer queries are truncated for the models
    max_size: int = Field(100, ge=1)
    max_from: int = Field(1000, ge=0)
    max_queue: int = Field(64, ge=1)  # pending requests before answering 429
    batch_max_size: int = Field(32, ge=1)
    batch_max_wait_ms: float = Field(3.0, ge=0)
    embedding_cache_size: int = Field(10_000, ge=0)
    rerank_cache_size: int = Field(100_000, ge=0)
    cache_ttl_s: float = Field(600.0, gt=0)
    batching_enabled: bool = True  # gather concurrent model calls into shared batches
    allow_scripts: bool = False  # pass bodies carrying scripts to the upstream (code runs on the cluster)
    upstream_timeout_s: float = Field(10.0, gt=0)
    max_rerank_documents: int = Field(1000, ge=1)  # /v1/rerank
    max_embed_inputs: int = Field(256, ge=1)  # /v1/embed
    max_mget_docs: int = Field(1000, ge=1)  # proxy _mget: ids per request (bounded work per slot)
    warm_up: bool = True  # one search at startup, before taking traffic (lazy loads)
    # allocations between young-generation collections (Python's default 700): middleware.server.heap
    gc_young_threshold: int = Field(10_000, ge=0)
    # the shared batching queue: tokens (rows x longest row) in one model call
    batch_max_tokens: int = Field(16_384, ge=1)

    @field_validator("api_keys", "allowed_indices", mode="before")
    @classmethod
    def _csv_lists(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().startswith("["):  # a JSON list works too
            import json

            return json.loads(v)
        return _split_csv(v)


def _split_csv(v: Any) -> Any:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


class RemoteModelSettings(BaseModel):
    """How we talk to model servers when `embedder` / `reranker` is a URL (shared by both clients)."""

    timeout_s: float = Field(5.0, gt=0)  # one call's whole budget, retries and backoff included
    connect_timeout_s: float = Field(2.0, gt=0)
    max_retries: int = Field(2, ge=0)  # on 429, 502, 503, 504 and connection errors
    backoff_s: float = Field(0.1, gt=0)  # doubles per retry; a Retry-After header is honoured up to the budget
    max_batch_size: int = Field(32, ge=1)  # inputs per request (servers cap it: TEI 32, OpenAI 2048)
    max_connections: int = Field(16, ge=1)  # pooled connections per server
    verify_certs: bool = True
    ca_certs: Path | None = None


class EventSettings(BaseModel):
    """The learning loop's log: searches served (query records) and shoppers' actions on them (events).

    Embedded: `<data_dir>/events.sqlite`. OpenSearch: the `queries_index` / `events_index` indexes
    (UBI's own names by default, so UBI's dashboards and the Search Relevance Workbench read them);
    events that cannot be trusted go to `<events_index>_untrusted`.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True  # log searches and accept POST /v1/events
    # share of searches logged, decided by a hash of the query_id (an event can tell a sampled-out
    # search from an unknown one)
    query_log_sample_rate: float = Field(1.0, ge=0, le=1)
    max_events_per_request: int = Field(1000, ge=1, le=100_000)
    # per API key (or client address without keys), per process: events per second, and the burst
    rate_limit_events_per_s: float = Field(2000.0, gt=0)
    rate_limit_burst: int = Field(10_000, ge=1)
    # the background query-log writer: records per write, and the longest a record waits
    writer_batch_size: int = Field(500, ge=1)
    writer_flush_ms: float = Field(200.0, gt=0)
    writer_queue_size: int = Field(100_000, ge=1)  # records waiting; beyond it new ones are dropped and counted
    queries_index: str = Field("ubi_queries", min_length=1, max_length=200)
    events_index: str = Field("ubi_events", min_length=1, max_length=200)

    @model_validator(mode="after")
    def _burst_holds_a_request(self) -> EventSettings:
        if self.rate_limit_burst < self.max_events_per_request:
            raise ValueError(
                f"rate_limit_burst ({self.rate_limit_burst}) must be at least max_events_per_request "
                f"({self.max_events_per_request}): a full request could never pass"
            )
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SHOPSEARCH_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    # storage
    backend: Literal["embedded", "opensearch"] = "embedded"
    data_dir: Path = Path("./shopsearch-data")
    # query-time lexical expansion: the synonym set's JSON file (None: synonyms.json in data_dir), and
    # typo tolerance (a Latin-script word no title word equals also looks for its nearest title words)
    synonyms_file: Path | None = None
    typo_tolerance: bool = True
    opensearch: OpenSearchSettings = Field(default_factory=OpenSearchSettings)

    # models: a hub id, a local directory, or "none" to disable the stage
    embedder: str = DEFAULT_EMBEDDER
    embedder_runtime: Literal["onnx", "torch"] = "onnx"
    embedder_precision: Literal["auto", "fp32", "fp16", "int8"] = "fp32"
    query_instruction: str | None = None  # None: the model's own default (BGE zh: 为这个句子…)
    reranker: str = DEFAULT_RERANKER
    reranker_precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"  # auto: fp16 on CUDA, int8 on CPU
    # other rerankers a search may name (`SearchRequest.reranker`, an A/B variant's overlay): name -> hub id,
    # local directory or URL, loaded like `reranker` the first time a search names it, once per process
    rerankers: dict[str, str] = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_cache_dir: Path = Field(default_factory=default_model_cache)
    max_length: int = Field(512, ge=8)
    batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1)  # onnxruntime intra-op threads; None = core count
    onnx_io_binding: bool = False  # bind model inputs/outputs explicitly (saves copies on CUDA)
    # remote model servers: `embedder` / `reranker` given as an http(s) URL
    embedder_api: Literal["openai", "tei"] = "openai"  # openai: POST {url}/embeddings; tei: POST {url}/embed
    embedder_model: str | None = None  # the served model name (openai: required; tei: read from /info)
    embedder_api_key: SecretStr | None = None  # sent as Authorization: Bearer
    reranker_api: Literal["tei", "cohere"] = "tei"  # tei: POST {url}/rerank; cohere: POST {url}/v1/rerank
    reranker_model: str | None = None
    reranker_api_key: SecretStr | None = None
    remote_models: RemoteModelSettings = Field(default_factory=RemoteModelSettings)

    # query pipeline
    retrieve_n: int = Field(100, ge=1)
    rerank_k: int | None = Field(None, ge=0)  # None: 100 with a GPU, 20 on CPU
    deadline_ms: float = Field(2000.0, gt=0)
    # Caps on what one request may ask for (REST, proxy and library alike: above a cap is refused,
    # naming the parameter). The reranker dominates a request's cost: bge-reranker-v2-m3 scores about
    # 31-41 pairs/s on two CPU cores as ONNX INT8 (benchmarks/results/SUMMARY.md), so 200 pairs take
    # 5-6.5 s, within the 10 s deadline cap; on a GPU they take a fraction of a second. Retrieval and
    # fusion of 1000 candidates per list stay in milliseconds.
    max_retrieve_n: int = Field(1000, ge=1)
    max_rerank_k: int = Field(200, ge=0)
    max_deadline_ms: float = Field(10_000.0, gt=0)
    max_query_chars: int = Field(512, ge=1)  # longer queries are cut before retrieval and the models
    fusion: FusionSettings = Field(default_factory=FusionSettings)
    business: BusinessSettings = Field(default_factory=BusinessSettings)
    knn_floor: KnnFloorSettings = Field(default_factory=KnnFloorSettings)

    server: ServerSettings = Field(default_factory=ServerSettings)
    events: EventSettings = Field(default_factory=EventSettings)

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> Settings:
        for name, cap in (
            ("retrieve_n", "max_retrieve_n"),
            ("rerank_k", "max_rerank_k"),
            ("deadline_ms", "max_deadline_ms"),
        ):
            value, limit = getattr(self, name), getattr(self, cap)
            if value is not None and value > limit:
                raise ValueError(f"{name} ({value:g}) must not exceed {cap} ({limit:g})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("SHOPSEARCH_CONFIG")
        if path:
            sources.append(_file_source(settings_cls, Path(path)))
        return tuple(sources)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Settings:
        """Settings from a TOML or YAML file; environment variables and overrides still win."""
        path = Path(path)
        file_source = _file_source(cls, path)
        values = file_source()
        # env must beat the file: build from the file, then let env + overrides replace keys
        env_only = cls(**overrides)
        merged = _deep_merge(values, env_only.model_dump(exclude_unset=True))
        return cls.model_validate(merged)

    @property
    def embedder_enabled(self) -> bool:
        return self.embedder.strip().lower() not in {"", "none", "off"}

    @property
    def reranker_enabled(self) -> bool:
        return self.reranker.strip().lower() not in {"", "none", "off"}


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in {".yaml", ".yml"}:
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ValueError(f"configuration file must be .toml, .yaml or .yml: {path}")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
