"""Shared set-up of a model: resolve, read config, build the ONNX or PyTorch runner."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from middleware.models.errors import ModelLoadError
from middleware.models.onnx_export import EXPORT_EXTRA_HINT, Task, onnx_model_path
from middleware.models.resolve import ModelKind, ResolvedModel
from middleware.models.runtime import (
    Device,
    OnnxRunner,
    TorchRunner,
    choose_device,
    create_session,
    resolve_precision,
)

log = logging.getLogger(__name__)

Runtime = Literal["onnx", "torch"]
Runner = OnnxRunner | TorchRunner

# model types whose position ids start after the padding index (RoBERTa family)
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"}

_OUTPUT_NAME: dict[Task, str] = {"feature-extraction": "last_hidden_state", "text-classification": "logits"}


def read_config(model: ResolvedModel, kind: ModelKind) -> dict[str, Any]:
    try:
        return json.loads((model.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the {kind} '{model.model_id}': bad config.json ({err})") from None


def effective_max_length(config: dict[str, Any], requested: int) -> int:
    """`requested`, capped by how many positions the model has."""
    if requested < 8:
        raise ValueError(f"max_length must be at least 8, got {requested}")
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return requested
    if config.get("model_type") in _OFFSET_POSITION_MODELS:
        positions -= int(config.get("pad_token_id", 1)) + 1
    if requested > positions:
        log.info("max_length %d capped at the model's %d positions", requested, positions)
    return min(requested, positions)


@dataclass(frozen=True)
class LoadedRunner:
    runner: Runner
    device: Device
    precision: str
    runtime: Runtime


def load_runner(
    model: ResolvedModel,
    *,
    kind: ModelKind,
    task: Task,
    runtime: Runtime,
    precision: str,
    device: str,
    cache_dir: Path | None,
    threads: int | None,
    io_binding: bool = False,
) -> LoadedRunner:
    if runtime == "onnx":
        return _load_onnx(model, kind, task, precision, device, cache_dir, threads, io_binding)
    if runtime == "torch":
        return _load_torch(model, kind, task, precision, device, threads)
    raise ValueError(f"runtime must be 'onnx' or 'torch', got {runtime!r}")


def _load_onnx(
    model: ResolvedModel,
    kind: ModelKind,
    task: Task,
    precision: str,
    device: str,
    cache_dir: Path | None,
    threads: int | None,
    io_binding: bool,
) -> LoadedRunner:
    if cache_dir is None:
        from middleware.config import default_model_cache

        cache_dir = default_model_cache()
    wanted_device = choose_device(device)
    chosen = resolve_precision(precision, wanted_device)
    path = onnx_model_path(model, task=task, precision=chosen, cache_dir=cache_dir, kind=kind)
    session, actual_device = create_session(path, wanted_device, threads)
    if wanted_device == "cuda" and actual_device == "cpu" and precision == "auto" and chosen == "fp16":
        # "auto" means the best precision for where we actually run: INT8 on the CPU
        log.warning("%s: FP16 was chosen for CUDA, which did not start; switching to INT8 on the CPU", kind)
        chosen = "int8"
        path = onnx_model_path(model, task=task, precision=chosen, cache_dir=cache_dir, kind=kind)
        session, actual_device = create_session(path, "cpu", threads)
    log.info("%s %s: ONNX %s on %s (%s)", kind, model.model_id, chosen, actual_device, path)
    runner = OnnxRunner(session, _OUTPUT_NAME[task], io_binding=io_binding)
    return LoadedRunner(runner, actual_device, chosen, "onnx")


def _load_torch(
    model: ResolvedModel, kind: ModelKind, task: Task, precision: str, device: str, threads: int | None
) -> LoadedRunner:
    try:
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification
    except ImportError as err:
        raise ModelLoadError(
            f"runtime 'torch' for the {kind} '{model.model_id}' needs {err.name or 'PyTorch'} "
            f"(the export extra: {EXPORT_EXTRA_HINT}); runtime 'onnx' does not"
        ) from None

    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        log.warning("device 'cuda' requested but PyTorch sees no GPU: using the CPU")
    torch_device: Device = "cuda" if use_cuda else "cpu"
    chosen = ("fp16" if use_cuda else "fp32") if precision == "auto" else precision
    if chosen == "int8":
        raise ValueError("precision 'int8' needs runtime 'onnx' (dynamic quantisation is done in onnxruntime)")
    if chosen == "fp16" and not use_cuda:
        raise ValueError("precision 'fp16' with runtime 'torch' needs a CUDA GPU; use 'fp32' or runtime 'onnx'")
    if threads:
        torch.set_num_threads(threads)  # process-wide in PyTorch
    model_class = AutoModel if task == "feature-extraction" else AutoModelForSequenceClassification
    try:
        torch_model = model_class.from_pretrained(str(model.path)).eval()
    except Exception as err:
        raise ModelLoadError(f"cannot load the {kind} '{model.model_id}' with PyTorch: {err}") from None
    if chosen == "fp16":
        torch_model = torch_model.half()
    torch_model = torch_model.to(torch_device)
    input_names = ["input_ids", "attention_mask"]
    accepts_types = "token_type_ids" in inspect.signature(torch_model.forward).parameters
    if accepts_types and getattr(torch_model.config, "type_vocab_size", 1) > 1:
        input_names.append("token_type_ids")
    runner = TorchRunner(torch_model, _OUTPUT_NAME[task], input_names, torch_device)
    return LoadedRunner(runner, torch_device, chosen, "torch")
