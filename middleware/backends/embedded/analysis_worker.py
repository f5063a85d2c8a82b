"""A worker process of `lexical.ParallelAnalysis`: reads a JSON list of [title, body] pairs per line
on stdin, writes their `product_text` token strings on stdout, one line each (a JSON object has no
raw line break), so the caller stores them as read, without decoding a list of strings."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from middleware.backends.embedded.lexical import analyse_texts

    for line in sys.stdin:
        pairs = json.loads(line)
        sys.stdout.write("".join(tokens + "\n" for tokens in analyse_texts([(str(t), str(b)) for t, b in pairs])))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
