"""Pieces both trainers share: base-model resolution, device checks, subsampling, the run manifest."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

MANIFEST = "shopsearch_tuning.json"


class TrainingSetupError(ValueError):
    """A bad training option (fp16 without a GPU, resume without a checkpoint, …): one clear line."""


def resolve_base(name_or_path: str, kind: Literal["embedder", "reranker"]) -> Path:
    """A local directory for the base model: a path as is, a hub id through middleware.models'
    resolver (pip-packaged all-MiniLM-L6-v2, the HF cache, …)."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TrainingSetupError(f"--base {name_or_path}: no config.json in that directory")
        return path
    from middleware.models.errors import ModelLoadError
    from middleware.models.resolve import resolve_model

    try:
        return resolve_model(name_or_path, kind=kind).path
    except ModelLoadError as err:
        raise TrainingSetupError(f"--base {name_or_path}: {err}") from None


def default_query_instruction(base: str) -> str:
    """The instruction the base model was trained with, by the rule the product's Embedder applies at
    search time (the saved "query" prompt, else the BGE zh prefix for bge-*-zh* models): training and
    serving never disagree."""
    from middleware.models.embedder import default_query_instruction as embedder_default
    from middleware.models.resolve import ResolvedModel

    path = Path(os.path.expanduser(base))
    if path.is_dir():
        return embedder_default(ResolvedModel(path, str(path), "local"))
    return embedder_default(ResolvedModel(resolve_base(base, "embedder"), base, "hub"))


def check_precision(fp16: bool) -> None:
    import torch

    if fp16 and not torch.cuda.is_available():
        raise TrainingSetupError("--fp16 needs a CUDA GPU; none is available here (train in fp32 on CPU)")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resume_argument(resume: bool, checkpoint_dir: Path) -> str | None:
    if not resume:
        return None
    last = latest_checkpoint(checkpoint_dir)
    if last is None:
        raise TrainingSetupError(f"--resume: no checkpoint-* directory in {checkpoint_dir}")
    return str(last)


def subsample(records: Sequence[dict[str, Any]], max_records: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded subsample in the original order (or all records)."""
    if max_records is None or max_records >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), max_records))
    return [records[i] for i in keep]


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]  # training loss at each logging step
    rows: int  # training examples (groups for the embedder, pairs for the reranker)
    notes: list[str] = field(default_factory=list)


def loss_history(log_history: Sequence[dict[str, Any]]) -> list[float]:
    return [float(entry["loss"]) for entry in log_history if "loss" in entry]


def write_manifest(output_dir: Path, payload: dict[str, Any]) -> None:
    (output_dir / MANIFEST).write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def trainer_arguments(config: Any, checkpoint_dir: Path) -> dict[str, Any]:
    """The training arguments both trainers (bi-encoder and cross-encoder) share, from a train config."""
    return {
        "output_dir": str(checkpoint_dir),
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "num_train_epochs": config.epochs,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "warmup_ratio": config.warmup_ratio,
        "weight_decay": config.weight_decay,
        "fp16": config.fp16,
        "gradient_checkpointing": config.gradient_checkpointing,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "logging_steps": config.logging_steps,
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": not logging.getLogger("middleware.tuning").isEnabledFor(logging.INFO),
    }
