"""Text embeddings: bge-style CLS pooling (or mean pooling for sentence-transformers models), L2
normalisation, the query instruction on queries only, length-sorted batches."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Encoding

from middleware.models.errors import ModelLoadError
from middleware.models.loading import Runtime, effective_max_length, load_runner, read_config
from middleware.models.resolve import ResolvedModel, resolve_model
from middleware.models.tokenization import TextTokenizer, check_texts

log = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]

# the instruction FlagEmbedding prepends to queries for bge-*-zh models (v1 and v1.5)
BGE_ZH_QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


def _name_tokens(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def saved_query_prompt(model_dir: Path) -> str | None:
    """The "query" prompt a sentence-transformers model was saved with (our fine-tuned embedders carry
    their instruction this way), or None when it names none."""
    path = model_dir / "config_sentence_transformers.json"
    if not path.is_file():
        return None
    try:
        prompts = json.loads(path.read_text(encoding="utf-8")).get("prompts") or {}
    except (ValueError, AttributeError) as err:
        raise ModelLoadError(f"{path} is not a valid sentence-transformers config: {err}") from None
    prompt = prompts.get("query") if isinstance(prompts, dict) else None
    return prompt if isinstance(prompt, str) else None


def default_query_instruction(model: ResolvedModel) -> str:
    """The query prompt saved with the model; else the BGE zh prefix for bge-*-zh* models (judged on the
    id's name parts only); else ""."""
    saved = saved_query_prompt(model.path)
    if saved is not None:
        return saved
    names = [model.model_id if model.source != "local" else model.path.name]
    if model.path.parent.name == "snapshots":  # a directory inside the HF cache: models--org--name
        names.append(model.path.parent.parent.name)
    for name in names:
        tokens = _name_tokens(name)
        if "bge" in tokens and "zh" in tokens:
            return BGE_ZH_QUERY_INSTRUCTION
    return ""


def detect_pooling(model_dir: Path) -> Pooling:
    """Pooling from the sentence-transformers files when present (modules.json → Pooling module
    config, or 1_Pooling/config.json), else CLS as bge models use."""
    pooling_dir: Path | None = None
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ModelLoadError(f"{modules_file} is not valid JSON: {err}") from None
        for module in modules:
            if str(module.get("type", "")).endswith("Pooling"):
                pooling_dir = model_dir / module.get("path", "1_Pooling")
                break
    elif (model_dir / "1_Pooling").is_dir():
        pooling_dir = model_dir / "1_Pooling"
    if pooling_dir is None or not (pooling_dir / "config.json").is_file():
        return "cls"
    config = json.loads((pooling_dir / "config.json").read_text(encoding="utf-8"))
    # sentence-transformers >= 5.7 writes "pooling_mode": "cls" | "mean"; older ones one flag per mode
    mode = config.get("pooling_mode")
    if isinstance(mode, str) and mode in ("cls", "mean"):
        return mode
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ModelLoadError(f"unsupported pooling in {pooling_dir / 'config.json'}: {modes} (cls or mean only)")


def _st_max_seq_length(model_dir: Path) -> int:
    """sentence-transformers' max_seq_length (all-MiniLM-L6-v2: 256), which its encode() honours."""
    path = model_dir / "sentence_bert_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, ValueError):
        return 1 << 30
    return int(value) if isinstance(value, int) and value >= 8 else 1 << 30


def pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    if pooling == "cls":
        return hidden[:, 0, :].astype(np.float32)
    mask = attention_mask[:, :, None].astype(np.float32)
    summed = (hidden.astype(np.float32) * mask).sum(axis=1)
    return summed / np.maximum(mask.sum(axis=1), 1e-9)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Embedder:
    """`Embedder(name_or_path, **options).encode_queries(texts)` → float32 array (n, dim)."""

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        runtime: Runtime = "onnx",
        precision: str = "fp32",
        device: str = "auto",
        pooling: Pooling | None = None,
        query_instruction: str | None = None,
        normalize: bool = True,
        max_length: int = 512,
        batch_size: int = 32,
        cache_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        io_binding: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if pooling not in (None, "cls", "mean"):
            raise ValueError(f"pooling must be 'cls', 'mean' or None (auto), got {pooling!r}")
        self._resolved = resolve_model(name_or_path, kind="embedder")
        config = read_config(self._resolved, "embedder")
        self.model_id: str = self._resolved.model_id
        self.dim: int = int(config["hidden_size"])
        self.pooling: Pooling = pooling or detect_pooling(self._resolved.path)
        self.query_instruction: str = (
            default_query_instruction(self._resolved) if query_instruction is None else query_instruction
        )
        self.normalize = normalize
        self.batch_size = batch_size
        self.max_length = min(effective_max_length(config, max_length), _st_max_seq_length(self._resolved.path))
        self._tokenizer = TextTokenizer(
            self._resolved.path, max_length=self.max_length, model_name=self.model_id, kind="embedder"
        )
        loaded = load_runner(
            self._resolved,
            kind="embedder",
            task="feature-extraction",
            runtime=runtime,
            precision=precision,
            device=device,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            threads=threads,
            io_binding=io_binding,
        )
        self._runner = loaded.runner
        self.runtime: Runtime = loaded.runtime
        self.precision: str = loaded.precision
        self.device: str = loaded.device

    def __repr__(self) -> str:
        return (
            f"Embedder({self.model_id!r}, runtime={self.runtime}, precision={self.precision}, "
            f"device={self.device}, pooling={self.pooling}, dim={self.dim})"
        )

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Queries get the query instruction prepended (bge zh models: 为这个句子生成表示以用于检索相关文章：)."""
        texts = check_texts(texts, "texts")
        return self._encode([self.query_instruction + t for t in texts])

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Documents are encoded as they are, never with the instruction."""
        return self._encode(check_texts(texts, "texts"))

    def tokenize_queries(self, texts: Sequence[str]) -> list[Encoding]:
        """The queries as `embed_encoded` takes them (instruction prepended, truncated), for a caller
        that plans its own batches."""
        texts = check_texts(texts, "texts")
        return self._tokenizer.encode_texts([self.query_instruction + t for t in texts])

    def embed_encoded(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """Vectors for already tokenised texts, in one model call over exactly this batch."""
        if not encodings:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self._tokenizer.pad(encodings)
        hidden = self._runner.run(batch.feeds(self._runner.input_names))
        out = pool(hidden, batch.attention_mask, self.pooling)
        return l2_normalize(out) if self.normalize else out

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_texts(texts)
        for batch in self._tokenizer.batches(encodings, self.batch_size):
            hidden = self._runner.run(batch.feeds(self._runner.input_names))
            out[batch.indices] = pool(hidden, batch.attention_mask, self.pooling)
        return l2_normalize(out) if self.normalize else out
