"""A worker process of `lexical.ParallelAnalysis`: reads a JSON list of [title, body] pairs per line
on stdin, writes the JSON list of their `product_text` token strings per line on stdout."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from middleware.backends.embedded.lexical import analyse_texts

    for line in sys.stdin:
        pairs = json.loads(line)
        sys.stdout.write(json.dumps(analyse_texts([(str(t), str(b)) for t, b in pairs]), ensure_ascii=False))
        sys.stdout.write("\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
