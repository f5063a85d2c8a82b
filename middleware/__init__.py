"""shopsearch: semantic product search middleware for OpenSearch (and an embedded default)."""

__version__ = "0.1.0"
