"""API keys: `Authorization: ApiKey <key>`, `x-api-key: <key>`, or HTTP Basic with the key as password.

Basic is accepted because OpenSearch clients configure credentials that way (`http_auth=(user, key)`).
Keys are compared in constant time against every configured key, so timing reveals neither which key
nor how much of a key matched. Health endpoints stay open for probes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from pathlib import Path

from middleware.config import ServerSettings


class ApiKeyError(ValueError):
    pass


def load_api_keys(server: ServerSettings) -> list[bytes]:
    """Configured keys: `server.api_keys` plus one key a line from `server.api_keys_file` (# comments)."""
    keys = [k.get_secret_value().strip() for k in server.api_keys]
    if server.api_keys_file is not None:
        path = Path(server.api_keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ApiKeyError(f"cannot read server.api_keys_file {path}: {err.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [k.encode("utf-8") for k in keys if k]


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries, if any (header names are case-insensitive)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    direct = lowered.get("x-api-key")
    if direct:
        return direct.strip()
    auth = lowered.get("authorization", "")
    scheme, _, value = auth.strip().partition(" ")
    scheme = scheme.lower()
    if scheme in {"apikey", "bearer"}:
        return value.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep else None
    return None


class ApiKeyChecker:
    def __init__(self, keys: list[bytes]) -> None:
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, headers: Mapping[str, str]) -> bool:
        if not self._keys:
            return True
        key = presented_key(headers)
        if not key:
            return False
        candidate = key.encode("utf-8", "surrogateescape")
        matched = False
        for k in self._keys:  # no early exit: every key is compared
            matched |= hmac.compare_digest(candidate, k)
        return matched
