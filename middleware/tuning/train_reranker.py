"""Cross-encoder fine-tuning on sentence-transformers' CrossEncoderTrainer.

Pointwise (`bce`, binary cross-entropy): examples are (query, document, label) pairs: positives
(label 1, or their graded label in [0, 1]), judged-but-not-relevant documents (their graded label, in
graded mode), and hard negatives (0). Listwise (`lambda`: LambdaLoss with the NDCG-Loss2++ weighting;
`listnet`: ListNet): one example per query, its documents (the same positives, judged documents and
negatives) scored together and ranked against their labels.
The saved directory is a plain `…ForSequenceClassification` checkpoint with one logit, which the
middleware's Reranker loads and exports to ONNX like any other.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from middleware.tuning.common import (
    TrainingSetupError,
    TrainResult,
    check_precision,
    loss_history,
    resolve_base,
    resume_argument,
    subsample,
    trainer_arguments,
    write_manifest,
)

log = logging.getLogger(__name__)

LabelMode = Literal["auto", "binary", "graded"]
LossName = Literal["bce", "lambda", "listnet"]
LOSSES: tuple[str, ...] = ("bce", "lambda", "listnet")


@dataclass
class RerankerTrainConfig:
    base: str = "BAAI/bge-reranker-v2-m3"
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 32  # pairs per step
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    labels: LabelMode = "auto"  # auto: graded when records carry pos_labels
    negatives_per_query: int = 7
    pos_weight: float | None = None  # None: #negative / #positive examples (BCE class balance)
    loss: LossName = "bce"
    max_docs_per_query: int = 16  # listwise: documents per query list (positives first, then judged, negatives)
    max_length: int = 256
    max_records: int | None = None
    gradient_checkpointing: bool = False
    fp16: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise TrainingSetupError("--batch-size and --max-steps must be ≥ 1")
        if self.negatives_per_query < 0:
            raise TrainingSetupError(f"--negatives-per-query must be ≥ 0, got {self.negatives_per_query}")
        if self.pos_weight is not None and self.pos_weight <= 0:
            raise TrainingSetupError(f"--pos-weight must be > 0, got {self.pos_weight}")
        if self.loss not in LOSSES:
            raise TrainingSetupError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.max_docs_per_query < 2:
            raise TrainingSetupError(f"--max-docs-per-query must be ≥ 2, got {self.max_docs_per_query}")


def build_pairs(
    records: Sequence[dict[str, Any]], *, graded: bool, negatives_per_query: int, seed: int
) -> dict[str, list[Any]]:
    """Columns query, document, label (floats in [0, 1])."""
    columns: dict[str, list[Any]] = {"query": [], "document": [], "label": []}

    def add(query: str, doc: str, label: float) -> None:
        columns["query"].append(query)
        columns["document"].append(doc)
        columns["label"].append(float(label))

    for index, record in enumerate(records):
        query = record["query"]
        pos_labels = record.get("pos_labels") if graded else None
        for i, doc in enumerate(record["pos"]):
            add(query, doc, pos_labels[i] if pos_labels else 1.0)
        if graded:
            for doc, label in zip(record.get("judged") or [], record.get("judged_labels") or [], strict=False):
                add(query, doc, label)
        negs = list(record.get("neg") or [])
        rng = random.Random(f"{seed}:{index}")
        for doc in rng.sample(negs, min(len(negs), negatives_per_query)):
            add(query, doc, 0.0)
    return columns


def build_lists(
    records: Sequence[dict[str, Any]], *, graded: bool, negatives_per_query: int, max_docs: int, seed: int
) -> dict[str, list[Any]]:
    """Columns query, docs (a list per query), labels (a list per query, floats in [0, 1]) for the
    listwise losses: the same documents as `build_pairs`, one row per query, at most `max_docs` of them
    (negatives keep at least a quarter of the list). Queries whose list has one label only are dropped:
    a list with nothing to order teaches a listwise loss nothing."""
    pairs = build_pairs(records, graded=graded, negatives_per_query=negatives_per_query, seed=seed)
    grouped: dict[str, tuple[list[str], list[float]]] = {}
    for query, doc, label in zip(pairs["query"], pairs["document"], pairs["label"], strict=True):
        docs, labels = grouped.setdefault(query, ([], []))
        docs.append(doc)
        labels.append(label)
    columns: dict[str, list[Any]] = {"query": [], "docs": [], "labels": []}
    keep_negatives = max(1, max_docs // 4)
    for query, (docs, labels) in grouped.items():
        rated = [(d, x) for d, x in zip(docs, labels, strict=True) if x > 0]
        zeros = [(d, x) for d, x in zip(docs, labels, strict=True) if x <= 0]
        negatives = zeros[: max(keep_negatives, max_docs - len(rated))]
        chosen = (rated[: max_docs - len(negatives)] + negatives)[:max_docs]
        if len({x for _, x in chosen}) < 2:
            continue
        columns["query"].append(query)
        columns["docs"].append([d for d, _ in chosen])
        columns["labels"].append([x for _, x in chosen])
    return columns


def load_cross_encoder(base: str, *, max_length: int) -> Any:
    from sentence_transformers.cross_encoder import CrossEncoder

    path = resolve_base(base, "reranker")
    # a bi-encoder checkpoint (e.g. all-MiniLM-L6-v2) gets a fresh one-logit classification head
    return CrossEncoder(
        str(path),
        num_labels=1,
        max_length=max_length,
        device="cpu" if not torch.cuda.is_available() else None,
    )


def train_reranker(
    records: Sequence[dict[str, Any]], output_dir: str | Path, config: RerankerTrainConfig
) -> TrainResult:
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, LambdaLoss, ListNetLoss

    check_precision(config.fp16)
    output_dir = Path(output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    resume_from = resume_argument(config.resume, checkpoint_dir)

    records = subsample(records, config.max_records, config.seed)
    has_grades = all("pos_labels" in r for r in records)
    if config.labels == "graded" and not has_grades:
        raise TrainingSetupError("--labels graded: every record needs pos_labels (from `shopsearch tune make-pairs`)")
    graded = config.labels == "graded" or (config.labels == "auto" and has_grades)
    columns = build_pairs(records, graded=graded, negatives_per_query=config.negatives_per_query, seed=config.seed)
    labels = columns["label"]
    n_pos = sum(1 for x in labels if x >= 0.5)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        raise TrainingSetupError(
            f"training pairs need both classes: {n_pos} positive, {n_neg} negative "
            "(mine negatives first: `shopsearch tune mine-negatives`)"
        )
    pos_weight = config.pos_weight if config.pos_weight is not None else n_neg / n_pos
    if config.loss == "bce":
        dataset = Dataset.from_dict(columns)
    else:
        lists = build_lists(
            records,
            graded=graded,
            negatives_per_query=config.negatives_per_query,
            max_docs=config.max_docs_per_query,
            seed=config.seed,
        )
        if not lists["query"]:
            raise TrainingSetupError("listwise training needs queries whose documents differ in label")
        dataset = Dataset.from_dict(lists)

    model = load_cross_encoder(config.base, max_length=config.max_length)
    if config.loss == "lambda":
        loss: Any = LambdaLoss(model)
    elif config.loss == "listnet":
        loss = ListNetLoss(model)
    else:
        loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(pos_weight))
    args = CrossEncoderTrainingArguments(
        **trainer_arguments(config, checkpoint_dir),
    )
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train(resume_from_checkpoint=resume_from)
    model.save_pretrained(str(output_dir))
    result = TrainResult(
        output_dir=output_dir,
        steps=int(trainer.state.global_step),
        losses=loss_history(trainer.state.log_history),
        rows=len(dataset),
    )
    write_manifest(
        output_dir,
        {
            "kind": "reranker",
            "config": asdict(config),
            "labels": "graded" if graded else "binary",
            "loss": config.loss,
            "pos_weight": pos_weight if config.loss == "bce" else None,
            "records": len(records),
            "pairs": len(labels),
            "rows": len(dataset),
            "positive_pairs": n_pos,
            "negative_pairs": n_neg,
            "steps": result.steps,
            "losses": result.losses,
        },
    )
    return result
