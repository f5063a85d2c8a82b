"""Export a model to ONNX once, derive FP16 / INT8 files, and keep them in a cache.

Layout: `cache_dir/<safe model id>/<fingerprint>/<precision>/model.onnx` (+ `model.onnx_data` when
the graph exceeds protobuf's 2 GB limit). The fingerprint covers the model id, its revision, the
weights on disk (config.json content, weight file names, sizes and mtimes), the export task and
opset; the precision is the last path component. It does not cover the installed exporter
versions: a model exported once stays usable where PyTorch and optimum are not installed (serving
needs only onnxruntime); `fp32/export.json` records the versions that built it. Each precision
directory is built in a temporary sibling and renamed into place, under a file lock: a crash
leaves no half-written cache entry, and concurrent processes export only once.

Exporting needs the `export` extra (PyTorch, transformers, optimum-onnx); deriving FP16 and INT8
from an exported graph needs only onnx and onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Literal

from middleware.models.errors import ModelLoadError
from middleware.models.resolve import ResolvedModel

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
Task = Literal["feature-extraction", "text-classification"]

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx_data"
EXPORT_MANIFEST = "export.json"
EXPORT_EXTRA_HINT = "pip install 'shopsearch[export]'"
# recorded in the manifest of each export (not part of the cache key)
_BUILD_PACKAGES = ("optimum-onnx", "optimum", "transformers", "torch", "onnx", "onnxruntime")
# graphs larger than this are saved with their weights in ONNX_DATA_FILE (protobuf limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
LOCK_TIMEOUT_S = 3600.0  # a full-size export plus quantisation takes minutes, not hours

# how many times each precision was built in this process (tests check the cache is reused)
BUILD_COUNTS: Counter[str] = Counter()

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack")


def safe_model_id(model_id: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "--", model_id).strip("-.")
    return (cleaned or "model")[-120:]


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def fingerprint(model: ResolvedModel, *, task: Task, opset: int | None) -> str:
    config = model.path / "config.json"
    weights = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in model.path.iterdir()
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    )
    key = {
        "model_id": model.model_id,
        "revision": model.revision,
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "weights": weights,
        "task": task,
        "opset": opset,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: os.umask can only be read by setting it, which is process-wide
_UMASK = _read_umask()


def _build_atomically(final_dir: Path, build: Callable[[Path], None], label: str) -> None:
    """Run `build(tmp_dir)` and rename tmp_dir to final_dir, once across threads and processes."""
    from filelock import FileLock

    if (final_dir / ONNX_FILE).is_file():
        return
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final_dir.parent / f".{final_dir.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if (final_dir / ONNX_FILE).is_file():  # another process finished while we waited
            return
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-tmp-", dir=final_dir.parent))
        try:
            started = time.perf_counter()
            build(tmp_dir)
            os.chmod(tmp_dir, 0o777 & ~_UMASK)  # mkdtemp makes it private (0700)
            try:
                os.rename(tmp_dir, final_dir)
            except OSError:
                # lost a race with a process that ignores the lock (other host on shared storage)
                if not (final_dir / ONNX_FILE).is_file():
                    raise
            BUILD_COUNTS[final_dir.name] += 1
            log.info("%s built in %.1f s: %s", label, time.perf_counter() - started, final_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _drop_quantiser_advice(record: logging.LogRecord) -> bool:
    # onnxruntime's quantiser logs advice on the root logger ("consider pre-processing"): only that goes
    return "onnxruntime" not in record.pathname or "quantization" not in record.pathname


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what PyTorch's tracer, transformers and optimum print during an export (tracer and
    deprecation warnings, `torch_dtype` notices, the optional accelerate check): the export is
    checked by our own parity tests, and the user gets one progress line instead."""
    loggers = [logging.getLogger(name) for name in ("transformers", "optimum", "torch")]
    levels = [logger.level for logger in loggers]
    try:
        from transformers.utils import logging as hf_logging

        hf_verbosity: int | None = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:
        hf_verbosity = None
    root = logging.getLogger()
    root.addFilter(_drop_quantiser_advice)
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(_drop_quantiser_advice)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if hf_verbosity is not None:
            hf_logging.set_verbosity(hf_verbosity)


def _require_exporter(model: ResolvedModel, kind: str) -> Callable[..., object]:
    """optimum's `main_export`, or the one-line error naming the extra that provides it."""
    try:
        with _quiet_exporter():
            from optimum.exporters.onnx import main_export
    except ImportError as err:
        raise ModelLoadError(
            f"cannot use the {kind} '{model.model_id}': it is not exported to ONNX in the model cache yet, and "
            f"exporting needs {err.name or 'optimum'} (the export extra: {EXPORT_EXTRA_HINT})"
        ) from None
    return main_export


def _export_fp32(model: ResolvedModel, task: Task, opset: int | None, out_dir: Path, kind: str) -> None:
    main_export = _require_exporter(model, kind)
    with _quiet_exporter():
        main_export(
            str(model.path),
            output=out_dir,
            task=task,
            opset=opset,
            device="cpu",
            library_name="transformers",  # plain outputs (logits / last_hidden_state), pooling is ours
            do_validation=False,  # parity is checked by our tests, validation doubles the export time
            local_files_only=True,
        )
    # optimum copies tokenizer/config files beside the graph; the cache keeps the graph and its
    # external weights only (whatever names the exporter gave them)
    for path in out_dir.iterdir():
        if path.is_file() and path.suffix in (".json", ".txt", ".model"):
            path.unlink()
    manifest = {"model_id": model.model_id, "task": task, "opset": opset}
    manifest["versions"] = {name: _package_version(name) for name in _BUILD_PACKAGES}
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _initializer_bytes(model: object) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)  # type: ignore[attr-defined]


def _convert_fp16(src: Path, out_dir: Path) -> None:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # shape inference from the file works past 2 GB; weights are then read from beside src
    inferred = out_dir / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    graph = onnx.load(str(inferred), load_external_data=False)
    load_external_data_for_model(graph, str(src.parent))
    inferred.unlink()
    # keep_io_types: callers feed int64 ids and read FP32 outputs; only the inside runs in FP16
    graph = convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=True)
    external = _initializer_bytes(graph) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        graph,
        str(out_dir / ONNX_FILE),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=ONNX_DATA_FILE,
    )


def _quantize_int8(src: Path, out_dir: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(out_dir / ONNX_FILE),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def onnx_model_path(
    model: ResolvedModel,
    *,
    task: Task,
    precision: Precision,
    cache_dir: Path,
    opset: int | None = None,
    kind: str = "model",
) -> Path:
    """Path of the cached ONNX file for these options, exporting/converting it first if needed."""
    base = Path(cache_dir).expanduser() / safe_model_id(model.model_id) / fingerprint(model, task=task, opset=opset)
    fp32_dir = base / "fp32"
    wanted = base / precision / ONNX_FILE
    if wanted.is_file():
        return wanted
    if not (fp32_dir / ONNX_FILE).is_file():
        _require_exporter(model, kind)  # fail before the progress line when the export cannot run
    # the one line a user sees while a model is prepared on first use (the export itself is quiet)
    print(
        f"shopsearch: preparing the {kind} '{model.model_id}' as ONNX {precision}, once (cache: {base}) ...",
        end="",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    outcome = "failed"
    try:
        _build_atomically(
            fp32_dir,
            lambda out: _export_fp32(model, task, opset, out, kind),
            f"ONNX export of {model.model_id}",
        )
        with _quiet_exporter():
            if precision == "fp16":
                _build_atomically(
                    base / "fp16", lambda out: _convert_fp16(fp32_dir / ONNX_FILE, out), "FP16 conversion"
                )
            elif precision == "int8":
                _build_atomically(
                    base / "int8", lambda out: _quantize_int8(fp32_dir / ONNX_FILE, out), "INT8 quantisation"
                )
        outcome = f"done in {time.perf_counter() - started:.1f} s"
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"cannot prepare the {kind} '{model.model_id}' as ONNX {precision}: "
            f"{type(err).__name__}: {err} (cache: {base})"
        ) from err
    finally:
        print(f" {outcome}", file=sys.stderr, flush=True)
    return wanted
