from pathlib import Path

import pytest
from pydantic import ValidationError

from middleware.config import Settings


def test_defaults_are_the_bge_models():
    s = Settings()
    assert s.embedder == "BAAI/bge-large-zh-v1.5"
    assert s.reranker == "BAAI/bge-reranker-v2-m3"
    assert s.backend == "embedded" and s.fusion.rrf_k == 60


def test_env_prefix_and_nesting(monkeypatch):
    monkeypatch.setenv("SHOPSEARCH_DATA_DIR", "/tmp/x")
    monkeypatch.setenv("SHOPSEARCH_FUSION__METHOD", "rrf")
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH__URL", "https://a:9200, https://b:9200")
    s = Settings()
    assert s.data_dir == Path("/tmp/x")
    assert s.fusion.method == "rrf"
    assert s.opensearch.url == ["https://a:9200", "https://b:9200"]


def test_toml_and_yaml_files_with_env_on_top(tmp_path, monkeypatch):
    toml = tmp_path / "s.toml"
    toml.write_text('retrieve_n = 50\nreranker = "none"\n[business]\nw_sales = 0.3\n')
    s = Settings.from_file(toml)
    assert s.retrieve_n == 50 and not s.reranker_enabled and s.business.w_sales == 0.3
    yaml = tmp_path / "s.yaml"
    yaml.write_text("retrieve_n: 70\nfusion:\n  method: minmax\n")
    monkeypatch.setenv("SHOPSEARCH_RETRIEVE_N", "90")
    s = Settings.from_file(yaml)
    assert s.retrieve_n == 90 and s.fusion.method == "minmax"


def test_config_file_from_env(tmp_path, monkeypatch):
    path = tmp_path / "s.toml"
    path.write_text("rerank_k = 5\n")
    monkeypatch.setenv("SHOPSEARCH_CONFIG", str(path))
    assert Settings().rerank_k == 5


def test_unknown_or_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValidationError):
        Settings(retrieve_n=0)
    bad = tmp_path / "s.toml"
    bad.write_text("retrive_n = 5\n")
    with pytest.raises(ValidationError):
        Settings.from_file(bad)
    ini = tmp_path / "s.ini"
    ini.write_text("[x]\n")
    with pytest.raises(ValueError, match="toml"):
        Settings.from_file(ini)


def test_caps_come_from_env_and_bound_the_defaults(monkeypatch):
    monkeypatch.setenv("SHOPSEARCH_MAX_RERANK_K", "50")
    monkeypatch.setenv("SHOPSEARCH_MAX_DEADLINE_MS", "3000")
    s = Settings()
    assert (s.max_retrieve_n, s.max_rerank_k, s.max_deadline_ms) == (1000, 50, 3000)
    with pytest.raises(ValidationError, match=r"rerank_k \(60\) must not exceed max_rerank_k \(50\)"):
        Settings(rerank_k=60)
    with pytest.raises(ValidationError, match="deadline_ms"):
        Settings(deadline_ms=5000)


def test_business_settings_from_env(monkeypatch):
    monkeypatch.setenv("SHOPSEARCH_BUSINESS__MARGIN", "0.1")
    monkeypatch.setenv("SHOPSEARCH_BUSINESS__SALES_PRIOR", "0")
    s = Settings()
    assert s.business.margin == 0.1 and s.business.sales_prior == 0 and s.business.out_of_stock_penalty == 3.0
    monkeypatch.setenv("SHOPSEARCH_BUSINESS__W_STOCK", "0.05")
    with pytest.raises(ValidationError, match="w_stock"):
        Settings()
