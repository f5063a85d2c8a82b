"""`shopsearch serve`: bad usage fails in one line before any model loads."""

from __future__ import annotations

import socket

from middleware.cli import main


def test_serve_refuses_a_port_in_use(capsys, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code = main(["--data-dir", str(tmp_path), "serve", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and "port is in use" in err and err.count("\n") == 1


def test_serve_refuses_a_bad_port(capsys, tmp_path):
    assert main(["--data-dir", str(tmp_path), "serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_serve_reports_a_missing_model_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    code = main(["--data-dir", str(tmp_path), "serve", "--port", port, "--embedder", str(tmp_path / "no-such-model")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("shopsearch: ") and err.count("\n") == 1 and "Traceback" not in err


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_serve_reports_a_store_of_another_dimension_in_one_line(capsys, tmp_path, tiny_embedder_dir, monkeypatch):
    import numpy as np

    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import Product

    store = EmbeddedBackend(tmp_path / "data", dim=7)  # no tiny embedder makes 7-d vectors
    store.upsert([Product(id="p1", title="手表")], np.ones((1, 7), dtype=np.float32))
    store.close()
    monkeypatch.setenv("SHOPSEARCH_RERANKER", "none")
    code = main(
        ["--data-dir", str(tmp_path / "data"), "serve", "--port", _free_port(), "--embedder", str(tiny_embedder_dir)]
    )
    # a first use of the model may print its one export progress line before the error
    lines = [line for line in capsys.readouterr().err.splitlines() if "preparing the embedder" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("shopsearch: ") and "Traceback" not in lines[0]
    assert "7-d" in lines[0]


def test_serve_reports_contradictory_cluster_credentials_in_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setenv("SHOPSEARCH_SERVER__UPSTREAM_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH__USERNAME", "admin")
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH__PASSWORD", "inline")
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH__PASSWORD_FILE", str(tmp_path / "pw"))
    code = main(
        ["--data-dir", str(tmp_path), "serve", "--port", _free_port(), "--embedder", "none", "--reranker", "none"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "opensearch.password" in err and "from-file" not in err
