"""Contrastive fine-tuning of the bi-encoder on sentence-transformers' trainer.

Each training example is a group (query, pos, neg_1..neg_{g-1}) — group size g = 8 by default —
scored against every document in the batch (in-batch + hard negatives) with InfoNCE at
temperature 0.02 (MultipleNegativesRankingLoss, scale = 1/temperature). With teacher scores
(`pos_scores`/`neg_scores`, raw reranker logits) a KL term pulls the student's softmax over the group
towards the teacher's (FlagEmbedding's kd_loss_type=kl_div). The query instruction is a prompt on
the anchor column only; pooling is what the base model uses.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from middleware.tuning.common import (
    TrainingSetupError,
    TrainResult,
    check_precision,
    default_query_instruction,
    loss_history,
    resolve_base,
    resume_argument,
    subsample,
    trainer_arguments,
    write_manifest,
)

log = logging.getLogger(__name__)

KdMode = Literal["auto", "on", "off", "only"]


@dataclass
class EmbedderTrainConfig:
    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    max_steps: int | None = None  # None: run `epochs` epochs
    epochs: float = 1.0
    batch_size: int = 32  # groups per step
    group_size: int = 8  # 1 positive + (group_size - 1) negatives
    temperature: float = 0.02
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    query_instruction: str | None = None  # None: the base model's known default
    pooling: Literal["cls", "mean"] | None = None  # only for plain transformers bases (default cls)
    max_length: int = 128
    kd: KdMode = "auto"  # auto: KD + contrastive when every group has teacher scores
    kd_weight: float = 1.0
    teacher_temperature: float = 1.0  # softmax(teacher logits / T) is the KD target
    cached: bool = False  # CachedMultipleNegativesRankingLoss: large batches in bounded memory
    mini_batch_size: int = 32
    max_pos_per_query: int = 1
    max_records: int | None = None
    gradient_checkpointing: bool = False
    fp16: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise TrainingSetupError(f"--group-size must be ≥ 1, got {self.group_size}")
        if self.temperature <= 0:
            raise TrainingSetupError(f"--temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise TrainingSetupError("--batch-size and --max-steps must be ≥ 1")
        if self.cached and self.kd in ("on", "only"):
            raise TrainingSetupError("--cached works with the contrastive loss only; drop --kd or --cached")


# ---------------------------------------------------------------------------------------- data


def _fill(items: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """n distinct indices when there are enough, else all of them topped up by repeats."""
    if len(items) >= n:
        return rng.sample(list(items), n)
    return list(items) + rng.choices(list(items), k=n - len(items))


def build_groups(
    records: Sequence[dict[str, Any]],
    *,
    group_size: int,
    max_pos_per_query: int,
    seed: int,
    with_teacher: bool,
) -> tuple[dict[str, list[Any]], list[str]]:
    """Columns anchor, positive, negative_1..negative_{g-1} (+ label: teacher logits of the group).

    Records without negatives are skipped when g > 1 (the columns must be the same for every row).
    """
    n_neg = group_size - 1
    columns: dict[str, list[Any]] = {"anchor": [], "positive": []}
    columns.update({f"negative_{j + 1}": [] for j in range(n_neg)})
    if with_teacher:
        columns["label"] = []
    skipped = 0
    for index, record in enumerate(records):
        negs = record.get("neg") or []
        if n_neg and not negs:
            skipped += 1
            continue
        rng = random.Random(f"{seed}:{index}")
        pos_idx = rng.sample(range(len(record["pos"])), min(len(record["pos"]), max_pos_per_query))
        for p in pos_idx:
            neg_idx = _fill(range(len(negs)), n_neg, rng) if n_neg else []
            columns["anchor"].append(record["query"])
            columns["positive"].append(record["pos"][p])
            for j, k in enumerate(neg_idx):
                columns[f"negative_{j + 1}"].append(negs[k])
            if with_teacher:
                columns["label"].append(
                    [float(record["pos_scores"][p])] + [float(record["neg_scores"][k]) for k in neg_idx]
                )
    notes = [f"{skipped} records without negatives skipped"] if skipped else []
    return columns, notes


# ---------------------------------------------------------------------------------------- loss


class ContrastiveDistillLoss(nn.Module):
    """InfoNCE over in-batch + hard negatives, plus (optionally) KL(teacher softmax ‖ student softmax)
    over each group. One forward pass feeds both terms."""

    def __init__(
        self,
        model: Any,
        *,
        temperature: float,
        contrastive: bool,
        kd_weight: float,
        teacher_temperature: float,
    ) -> None:
        super().__init__()
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        self.model = model
        self.temperature = temperature
        self.contrastive = MultipleNegativesRankingLoss(model, scale=1.0 / temperature) if contrastive else None
        self.kd_weight = kd_weight
        self.teacher_temperature = teacher_temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        total = embeddings[0].new_zeros(())
        if self.contrastive is not None:
            total = total + self.contrastive.compute_loss_from_embeddings(embeddings, labels)
        if self.kd_weight > 0 and labels is not None and labels.dim() == 2:
            query = nn.functional.normalize(embeddings[0], dim=-1)
            docs = torch.stack([nn.functional.normalize(e, dim=-1) for e in embeddings[1:]], dim=1)
            student = torch.einsum("bd,bgd->bg", query, docs) / self.temperature
            teacher = torch.softmax(labels.to(student.dtype) / self.teacher_temperature, dim=-1)
            kd = nn.functional.kl_div(torch.log_softmax(student, dim=-1), teacher, reduction="batchmean")
            total = total + self.kd_weight * kd
        return total

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "contrastive": self.contrastive is not None,
            "kd_weight": self.kd_weight,
            "teacher_temperature": self.teacher_temperature,
        }


# ---------------------------------------------------------------------------------------- model


def load_student(base: str, *, max_length: int, pooling: Literal["cls", "mean"] | None) -> tuple[Any, str]:
    """A SentenceTransformer from the base; returns it and the pooling it uses."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    path = resolve_base(base, "embedder")
    if (path / "modules.json").is_file():
        model = SentenceTransformer(str(path), device="cpu" if not torch.cuda.is_available() else None)
        pooling_modules = [m for m in model if isinstance(m, Pooling)]
        used = pooling_modules[0].pooling_mode if pooling_modules else "unknown"
        if pooling and pooling != used:
            raise TrainingSetupError(
                f"--pooling {pooling}: the base {base} pools with {used} (its sentence-transformers config)"
            )
    else:
        used = pooling or "cls"  # plain transformers dirs: BGE-style CLS pooling
        transformer = Transformer(str(path), max_seq_length=max_length)
        model = SentenceTransformer(
            modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=used), Normalize()]
        )
    model.max_seq_length = max_length
    return model, used


def _add_legacy_pooling_keys(model_dir: Path, pooling: str) -> None:
    """sentence-transformers 5.7 writes `"pooling_mode": "cls"`; readers of the long-standing format
    (our Embedder, FlagEmbedding, older sentence-transformers) look for `pooling_mode_*_token(s)`.
    Write both: 5.7 drops the legacy keys when `pooling_mode` is present."""
    for module in json.loads((model_dir / "modules.json").read_text(encoding="utf-8")):
        if not str(module.get("type", "")).endswith("Pooling"):
            continue
        path = model_dir / module["path"] / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
        config.setdefault("word_embedding_dimension", dim)
        config.update(
            {
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": pooling == "mean_sqrt_len_tokens",
            }
        )
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- training


def train_embedder(
    records: Sequence[dict[str, Any]], output_dir: str | Path, config: EmbedderTrainConfig
) -> TrainResult:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    check_precision(config.fp16)
    output_dir = Path(output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    resume_from = resume_argument(config.resume, checkpoint_dir)

    records = subsample(records, config.max_records, config.seed)
    have_teacher = all("pos_scores" in r and "neg_scores" in r for r in records)
    if config.kd in ("on", "only") and not have_teacher:
        raise TrainingSetupError(
            f"--kd {config.kd}: every record needs pos_scores/neg_scores (run `shopsearch tune teacher-scores`)"
        )
    use_kd = config.kd in ("on", "only") or (config.kd == "auto" and have_teacher and not config.cached)
    group_size = config.group_size if any(r.get("neg") for r in records) else 1
    columns, notes = build_groups(
        records,
        group_size=group_size,
        max_pos_per_query=config.max_pos_per_query,
        seed=config.seed,
        with_teacher=use_kd,
    )
    if group_size == 1 and config.group_size > 1:
        notes.append("no record has negatives: in-batch negatives only (run `shopsearch tune mine-negatives`)")
    if not columns["anchor"]:
        raise TrainingSetupError("no training groups: every record lacks negatives")
    dataset = Dataset.from_dict(columns)

    model, pooling = load_student(config.base, max_length=config.max_length, pooling=config.pooling)
    instruction = (
        default_query_instruction(config.base) if config.query_instruction is None else config.query_instruction
    )
    if config.cached:
        loss: nn.Module = CachedMultipleNegativesRankingLoss(
            model, scale=1.0 / config.temperature, mini_batch_size=config.mini_batch_size
        )
    else:
        loss = ContrastiveDistillLoss(
            model,
            temperature=config.temperature,
            contrastive=config.kd != "only",
            kd_weight=config.kd_weight if use_kd else 0.0,
            teacher_temperature=config.teacher_temperature,
        )

    args = SentenceTransformerTrainingArguments(
        **trainer_arguments(config, checkpoint_dir),
        # the same query/text twice in a batch would be a false in-batch negative
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts={"anchor": instruction} if instruction else None,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train(resume_from_checkpoint=resume_from)

    # the instruction travels with the model: sentence-transformers' "query" prompt
    model.prompts = {"query": instruction} if instruction else {}
    model.default_prompt_name = None
    model.save(str(output_dir))
    _add_legacy_pooling_keys(output_dir, pooling)
    result = TrainResult(
        output_dir=output_dir,
        steps=int(trainer.state.global_step),
        losses=loss_history(trainer.state.log_history),
        rows=len(dataset),
        notes=notes,
    )
    write_manifest(
        output_dir,
        {
            "kind": "embedder",
            "config": asdict(config),
            "pooling": pooling,
            "query_instruction": instruction,
            "loss": "contrastive" + ("+kd" if use_kd else "") if config.kd != "only" else "kd",
            "group_size": group_size,
            "records": len(records),
            "groups": len(dataset),
            "steps": result.steps,
            "losses": result.losses,
            "notes": notes,
        },
    )
    return result
