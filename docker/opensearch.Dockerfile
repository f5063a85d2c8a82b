# OpenSearch for shopsearch: the official image (k-NN and neural-search bundled) + analysis-smartcn.
# 2.19.1, the version the test suite's node runs (tests/opensearch/pom.xml; the newest line whose core,
# k-NN and neural-search are all on Maven Central): hybrid query, normalization-processor (min_max, l2;
# z_score needs 3.0+), score-ranker-processor (rrf, since 2.19), faiss HNSW with sq fp16 and on_disk mode.
ARG OPENSEARCH_VERSION=2.19.1
FROM opensearchproject/opensearch:${OPENSEARCH_VERSION}
RUN /usr/share/opensearch/bin/opensearch-plugin install --batch analysis-smartcn
