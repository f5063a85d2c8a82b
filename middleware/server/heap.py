"""How a serving process sets up Python's garbage collector once its models and store are loaded.

Two rules, both about the cyclic collector's pauses, which stall every request in flight:
- freeze what start-up loaded (models, tokenizers, dictionaries, imported libraries): millions of
  long-lived objects that every full collection would otherwise walk again;
- collect the young generation less often: a search allocates thousands of short-lived containers
  (products, candidates, result lists), and at Python's default threshold a collection runs inside
  nearly every search, promoting the objects it holds to an older generation that costs more to scan.

Caveat: this sets process-wide interpreter state. The servers call it; a storefront backend that
embeds the library decides for itself whether to.
"""

from __future__ import annotations

import gc


def settle(young_threshold: int) -> None:
    """Collect, freeze everything alive now, and set the young generation's threshold (0 leaves it as it is)."""
    gc.collect()
    gc.freeze()
    if young_threshold > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young_threshold, older, oldest)
