# OpenSearch for shopsearch: the official image (k-NN and neural-search bundled) + analysis-smartcn.
# 3.1.0: hybrid query, normalization-processor (min_max, l2, z_score since 3.0), score-ranker-processor
# (rrf, since 2.19), faiss HNSW with sq fp16 encoder and on_disk mode.
ARG OPENSEARCH_VERSION=3.1.0
FROM opensearchproject/opensearch:${OPENSEARCH_VERSION}
RUN /usr/share/opensearch/bin/opensearch-plugin install --batch analysis-smartcn
