"""Test support shared by tests/ and benchmarks/: tiny model builders, the OpenSearch spec checker."""
