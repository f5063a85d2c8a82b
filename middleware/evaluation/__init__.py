"""Relevance evaluation on BEIR-layout judgments: metrics, pools, runs through the product's pipeline."""
