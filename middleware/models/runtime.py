"""onnxruntime sessions: execution provider, precision choice, and an honest CUDA fallback."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from middleware.models.errors import ModelLoadError

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def cuda_available() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def choose_device(device: str) -> Device:
    """ "auto" → CUDA when onnxruntime offers it, else CPU; "cuda" without it falls back, loudly."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if device == "cuda":
        log.warning("device 'cuda' requested but onnxruntime has no CUDA provider here: using the CPU")
    return "cpu"


def resolve_precision(precision: str, device: Device) -> Literal["fp32", "fp16", "int8"]:
    """ "auto": FP16 on CUDA, INT8 (dynamic quantisation) on the CPU."""
    if precision == "auto":
        return "fp16" if device == "cuda" else "int8"
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be 'auto', 'fp32', 'fp16' or 'int8', got {precision!r}")
    if precision == "fp16" and device == "cpu":
        log.warning("FP16 on the CPU provider computes in FP32 with casts: slower than fp32 or int8")
    return precision  # type: ignore[return-value]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about every constant-folded cast
    # idle intra-op threads sleep instead of spin-waiting: on a host shared with the search engine
    # (or with concurrent requests) spinning threads steal the cores the busy ones need (measured in
    # benchmarks/README.md, "No spin-waiting")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(path: Path, device: Device, threads: int | None) -> tuple[ort.InferenceSession, Device]:
    """A session and the device it really runs on (onnxruntime falls back to CPU silently)."""
    providers: list[str] = [CUDA_PROVIDER, CPU_PROVIDER] if device == "cuda" else [CPU_PROVIDER]
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
    except Exception as err:
        raise ModelLoadError(f"onnxruntime could not load {path}: {err}") from err
    actual: Device = "cuda" if session.get_providers()[0] == CUDA_PROVIDER else "cpu"
    if device == "cuda" and actual == "cpu":
        log.warning(
            "onnxruntime could not start CUDA for %s (missing CUDA/cuDNN libraries?): running on the CPU",
            path,
        )
    return session, actual


class OnnxRunner:
    """Runs one ONNX graph with one output; `session.run` is thread-safe in onnxruntime.

    With `io_binding`, inputs are bound from host memory and the output is fetched once per call:
    on CUDA this avoids onnxruntime's extra staging copies; on the CPU it changes nothing.
    """

    def __init__(self, session: ort.InferenceSession, output_name: str, *, io_binding: bool = False) -> None:
        self.session = session
        self.input_names: tuple[str, ...] = tuple(i.name for i in session.get_inputs())
        self.output_name = output_name
        self.io_binding = io_binding
        self.provider = session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], feeds)[0]
        binding = self.session.io_binding()  # one per call: bindings are not shared between threads
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_output(self.output_name)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


class TorchRunner:
    """The same interface over a PyTorch model (reference runtime, and `runtime="torch"`)."""

    def __init__(self, model: object, output_name: str, input_names: Sequence[str], device: Device) -> None:
        self.model = model
        self.output_name = output_name
        self.input_names = tuple(input_names)
        self.device = device
        self.provider = f"torch-{device}"

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()}
            output = getattr(self.model(**tensors), self.output_name)
            return output.float().cpu().numpy()
