"""GPU variants, selected automatically when a CUDA GPU is really usable; skipped with the reason otherwise.

Runs the product's Reranker and Embedder on onnxruntime's CUDA provider with IO binding, FP16 and FP32,
against PyTorch eager FP16 and sentence-transformers on the same GPU. TensorRT is reported as not
wired: the product creates CUDA sessions only (`middleware.models.runtime.create_session`).
Note: onnxruntime-gpu lists the CUDA provider even on machines without a GPU and silently falls back
to the CPU, so the check creates a session and looks at the provider it really got.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common


def gpu_status() -> tuple[bool, str]:
    """(usable, reason): usable only when onnxruntime runs a session on CUDA."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, f"onnxruntime offers no CUDA provider (providers: {', '.join(providers)})"
    if shutil.which("nvidia-smi") is None:
        return False, "onnxruntime-gpu is installed but no NVIDIA driver (nvidia-smi) is present"
    with tempfile.TemporaryDirectory() as tmp:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        path = Path(tmp) / "probe.onnx"
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if session.get_providers()[0] != "CUDAExecutionProvider":
            return False, "onnxruntime could not start CUDA (missing CUDA/cuDNN libraries?); it fell back to CPU"
    return True, "CUDA provider active"


def run(models: common.BenchModels, *, quick: bool, cache_dir: Path | None) -> dict[str, Any]:
    usable, reason = gpu_status()
    if not usable:
        return {"skipped": True, "reason": reason}
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from middleware.models import Embedder, Reranker

    top_k = 10 if quick else 100
    sets = common.rerank_sets("qbqtc", 2 if quick else 5, top_k, seed=11)
    docs = common.embed_docs("qbqtc", 32 if quick else 512, seed=5)
    results: dict[str, Any] = {"skipped": False, "reason": reason, "top_k": top_k}

    def time_rerank(score: Any) -> dict[str, float]:
        score(sets[0].query, sets[0].docs)
        timing = common.Timing()
        for s in sets:
            seconds, _ = common.timed(lambda s=s: score(s.query, s.docs))
            timing.add(seconds, len(s.docs))
        return timing.summary()

    for precision in ("fp16", "fp32"):
        reranker = Reranker(models.reranker, precision=precision, device="cuda", io_binding=True, cache_dir=cache_dir)
        results[f"ours reranker ONNX CUDA {precision} + IO binding"] = time_rerank(reranker.score) | {
            "device": reranker.device
        }
        del reranker
        gc.collect()
    tokenizer = AutoTokenizer.from_pretrained(models.reranker)
    model = AutoModelForSequenceClassification.from_pretrained(models.reranker).half().cuda().eval()

    def torch_score(query: str, batch: list[str], model: Any = model) -> np.ndarray:
        with torch.inference_mode():
            inputs = tokenizer([query] * len(batch), batch, padding=True, truncation=True, return_tensors="pt")
            return torch.sigmoid(model(**inputs.to("cuda")).logits[:, 0].float()).cpu().numpy()

    results["torch eager CUDA FP16"] = time_rerank(torch_score)
    del model, torch_score
    gc.collect()
    for precision in ("fp16", "fp32"):
        embedder = Embedder(models.embedder, precision=precision, device="cuda", io_binding=True, cache_dir=cache_dir)
        embedder.encode_documents(docs[:8])
        seconds, _ = common.timed(lambda e=embedder: e.encode_documents(docs))
        results[f"ours embedder ONNX CUDA {precision} + IO binding"] = {"docs_per_s": len(docs) / seconds}
        del embedder
        gc.collect()
    results["tensorrt"] = "not run: the product does not create TensorRT sessions"
    return results
