"""The machine's limit: FLOP/s of plain matrix products with the transformer layer's own shapes.

One ONNX graph per token count T holds the four weight products of a BERT/XLM-R-large layer,
(T×1024)·(1024×3072) (Q, K, V fused as onnxruntime fuses them), (T×1024)·(1024×1024) (attention
output), (T×1024)·(1024×4096) and (T×4096)·(4096×1024) (feed-forward), for `layers` distinct weight
sets so the weights stream from memory as in the model. FP32 runs as MatMul; INT8 is the same graph
through `quantize_dynamic` (the product's own quantiser), i.e. DynamicQuantizeLinear + MatMulInteger,
fused by onnxruntime into DynamicQuantizeMatMul. The sessions use the product's SessionOptions
(`middleware.models.runtime.session_options`), hence the same thread settings. numpy and torch
FP32 products of the same shapes are there for reference.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN = 1024
INTERMEDIATE = 4096


def layer_flops(tokens: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> int:
    """2·T·(weights of one layer's four products) = 2·T·(4·h² + 2·h·i)."""
    return 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)


def _layer_graph(path: Path, layers: int, hidden: int, intermediate: int, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []

    def weight(name: str, rows: int, cols: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), name))
        return name

    for layer in range(layers):
        p = f"l{layer}_"
        for label, cols in (("qkv", 3 * hidden), ("attn_out", hidden), ("ffn_up", intermediate)):
            nodes.append(helper.make_node("MatMul", ["x", weight(p + label, hidden, cols)], [p + label + "_y"]))
            outputs.append((p + label + "_y", cols))
        nodes.append(
            helper.make_node(
                "MatMul", [p + "ffn_up_y", weight(p + "ffn_down", intermediate, hidden)], [p + "ffn_down_y"]
            )
        )
        outputs.append((p + "ffn_down_y", hidden))
    graph = helper.make_graph(
        nodes,
        "layer_gemms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["tokens", cols]) for name, cols in outputs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))


def _rate(fn: Callable[[], Any], flops: int, min_seconds: float, min_runs: int = 3) -> dict[str, float]:
    fn()  # warm-up: allocations, packing of weights
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"gflops_median": flops / median / 1e9, "gflops_best": flops / times[0] / 1e9, "runs": len(times)}


def onnx_layer_rates(
    token_counts: list[int], *, threads: int | None, layers: int, min_seconds: float, work_dir: Path
) -> dict[str, dict[str, dict[str, float]]]:
    """GFLOP/s of the layer products in onnxruntime, FP32 and dynamic INT8, per token count."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from middleware.models.runtime import session_options

    fp32_path, int8_path = work_dir / "gemm_fp32.onnx", work_dir / "gemm_int8.onnx"
    _layer_graph(fp32_path, layers, HIDDEN, INTERMEDIATE)
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for precision, path in (("fp32", fp32_path), ("int8", int8_path)):
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        results[precision] = {}
        for tokens in token_counts:
            x = np.random.default_rng(1).standard_normal((tokens, HIDDEN)).astype(np.float32)
            results[precision][str(tokens)] = _rate(
                lambda s=session, x=x: s.run(None, {"x": x}), layers * layer_flops(tokens), min_seconds
            )
    return results


def reference_rates(
    token_counts: list[int], *, threads: int, min_seconds: float
) -> dict[str, dict[str, dict[str, float]]]:
    """The same four products with numpy and torch FP32 (one weight set)."""
    import torch

    from benchmarks.common import torch_threads

    rng = np.random.default_rng(0)
    shapes = ((HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN))
    weights = [(rng.standard_normal(s) * 0.02).astype(np.float32) for s in shapes]
    results: dict[str, dict[str, dict[str, float]]] = {"numpy_fp32": {}, "torch_fp32": {}}
    for tokens in token_counts:
        x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
        h = rng.standard_normal((tokens, INTERMEDIATE)).astype(np.float32)
        inputs = (x, x, x, h)

        def numpy_layer(inputs: tuple[np.ndarray, ...] = inputs) -> None:
            for a, w in zip(inputs, weights, strict=True):
                a @ w

        results["numpy_fp32"][str(tokens)] = _rate(numpy_layer, layer_flops(tokens), min_seconds)
        t_inputs = [torch.from_numpy(a) for a in inputs]
        t_weights = [torch.from_numpy(w) for w in weights]

        def torch_layer(t_inputs: list[Any] = t_inputs, t_weights: list[Any] = t_weights) -> None:
            with torch.inference_mode():
                for a, w in zip(t_inputs, t_weights, strict=True):
                    torch.matmul(a, w)

        with torch_threads(threads):
            results["torch_fp32"][str(tokens)] = _rate(torch_layer, layer_flops(tokens), min_seconds)
    return results


def run(token_counts: list[int], *, threads: int, quick: bool) -> dict[str, Any]:
    min_seconds = 0.02 if quick else 1.5
    layers = 1 if quick else 4  # 4 distinct FP32 layers = 192 MB of weights: more than the L3 cache
    with tempfile.TemporaryDirectory(prefix="shopsearch-gemm-") as tmp:
        rates = onnx_layer_rates(
            token_counts, threads=threads, layers=layers, min_seconds=min_seconds, work_dir=Path(tmp)
        )
    rates.update(reference_rates(token_counts, threads=threads, min_seconds=min_seconds))
    return {
        "what": "GFLOP/s of one transformer-large layer's four weight products (h=1024, i=4096)",
        "threads": threads,
        "distinct_layers_in_onnx_graph": layers,
        "token_counts": token_counts,
        "rates": {f"onnxruntime_{k}" if k in ("fp32", "int8") else k: v for k, v in rates.items()},
    }


def probe(threads: int | None, seconds: float = 0.3) -> float:
    """A short FP32 GEMM rate (GFLOP/s) to record machine load drift between benchmark sections."""
    import torch

    from benchmarks.common import torch_threads

    a = torch.randn(512, HIDDEN)
    b = torch.randn(HIDDEN, INTERMEDIATE)
    with torch_threads(threads or 1), torch.inference_mode():
        rate = _rate(lambda: torch.matmul(a, b), 2 * 512 * HIDDEN * INTERMEDIATE, seconds)
    return round(rate["gflops_median"], 1)
