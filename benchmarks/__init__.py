"""Speed benchmarks: the product's own Reranker and Embedder against peers and against the machine.

`python -m benchmarks [--quick] [--only rerank,embed,service,index] [--output DIR]`.
Figures and JSON only, never assertions: speed targets are checked by reading the report.
"""

from __future__ import annotations

RANDOM_WEIGHTS_NOTE = (
    "random-initialised weights with the exact architecture: same FLOPs as the real models; rankings meaningless"
)
