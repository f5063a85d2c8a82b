"""The tuning loop (optional extra `tune`): training pairs, hard negatives, teacher scores, fine-tuning.

Heavy libraries (torch, sentence-transformers, datasets, faiss) are imported by the modules that
need them, so `import middleware.tuning` stays cheap.
"""
