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
