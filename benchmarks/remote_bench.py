"""`python -m benchmarks.remote_bench [--docs N] [--rounds R] [--output DIR]`

The remote embedder against infinity-emb (its own virtualenv: tests/remote/setup-infinity) serving the
packaged all-MiniLM-L6-v2 on CPU, beside the same model in process (ONNX FP32):
- infinity's startup time (process start → /v1/models lists the model);
- parity: cosine between remote and in-process vectors of real titles and queries (qbqtc, homedepot);
- latency per batch (1 query; 32 titles) remote vs in process, median of R rounds, run one after the
  other so the two never share the cores; and the bare HTTP request without our client, so the
  client's own cost shows as the difference.
Writes remote.json to the output directory (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import common
from middleware.models import Embedder
from middleware.models.remote import RemoteEmbedder
from tests.remote.infinity import EMBEDDER_NAME, INSTALL_HINT, InfinityServer, infinity_executable, minilm_dir


def _median_ms(fn: Any, rounds: int) -> float:
    fn()  # warm
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(n_docs: int, rounds: int, output_dir: Path) -> dict[str, Any]:
    if infinity_executable() is None:
        raise SystemExit(INSTALL_HINT)
    path = minilm_dir()
    local = Embedder(str(path))
    titles: list[str] = []
    queries: list[str] = []
    for dataset in ("qbqtc", "homedepot"):
        titles += common.embed_docs(dataset, n_docs // 2)
        queries += common.corpus_texts(dataset)[1][: n_docs // 4]
    with InfinityServer({EMBEDDER_NAME: path}) as server:
        remote = RemoteEmbedder(server.url, model=EMBEDDER_NAME, max_batch_size=32, timeout_s=60.0)
        parity: dict[str, Any] = {}
        for name, texts, encode in (("titles", titles, "encode_documents"), ("queries", queries, "encode_queries")):
            sims = _cosines(getattr(remote, encode)(texts), getattr(local, encode)(texts))
            parity[name] = {"n": len(texts), "min": float(sims.min()), "max": float(sims.max())}
        batch = titles[:32]
        raw = httpx.Client()  # the same request without our client: what the server itself costs
        latency = {
            "query_raw_http_ms": _median_ms(
                lambda: raw.post(server.url + "/embeddings", json={"model": EMBEDDER_NAME, "input": queries[:1]}),
                rounds,
            ),
            "query_remote_ms": _median_ms(lambda: remote.encode_queries(queries[:1]), rounds),
            "query_in_process_ms": _median_ms(lambda: local.encode_queries(queries[:1]), rounds),
            "batch32_remote_ms": _median_ms(lambda: remote.encode_documents(batch), rounds),
            "batch32_in_process_ms": _median_ms(lambda: local.encode_documents(batch), rounds),
        }
        startup_s = round(server.startup_s or 0.0, 1)
        remote.close()
        raw.close()
    result = {
        "machine": common.machine_info(),
        "server": "infinity-emb 0.0.78, torch engine, CPU, all-MiniLM-L6-v2 (served as minilm)",
        "in_process": f"{local!r}",
        "infinity_startup_s": startup_s,
        "parity_cosine": parity,
        "latency": latency,
        "rounds": rounds,
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "remote.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=512, help="titles for the parity check (half per dataset)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per latency figure")
    parser.add_argument("--output", type=Path, default=common.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    result = run(args.docs, args.rounds, args.output)
    print(json.dumps({k: result[k] for k in ("infinity_startup_s", "parity_cosine", "latency")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
