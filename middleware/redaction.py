"""Credentials out of text: URLs may carry user:password@ (an upstream, an OpenSearch host), and error
messages and logs must never show them."""

from __future__ import annotations

import logging
import re

_URL_CREDENTIALS = re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")


def redact(message: str) -> str:
    """Drop credentials embedded in URLs (user:password@host) from text shown to clients or logs."""
    return _URL_CREDENTIALS.sub(r"\1***@", message)


class RedactingFilter(logging.Filter):
    """Log handler filter: credentials in URLs never reach the log, whichever module logged them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
