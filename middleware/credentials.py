"""The cluster's credentials from the settings: one rule shared by the OpenSearch client and the proxy.

Each secret comes from exactly one place: inline (`opensearch.password`, `opensearch.api_key`) or a
file (`opensearch.password_file`, `opensearch.api_key_file`, read once, surrounding whitespace and the
trailing newline stripped). Anything ambiguous or unusable is refused with the setting's name, never
with the secret: both sources at once, an empty or unreadable secret, a username without a password
(or a password without a username), and username/password together with an api key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import SecretStr

    from middleware.config import OpenSearchSettings


class CredentialsError(ValueError):
    """The credential settings are contradictory or unusable; the message names the setting."""


@dataclass(frozen=True)
class ClusterCredentials:
    """What to authenticate to the cluster with: Basic (username + password), an API key, or nothing."""

    username: str | None = None
    password: str | None = None
    api_key: str | None = None

    def __repr__(self) -> str:  # never print a secret, even in a traceback's locals
        shown = {k: ("***" if k != "username" and v else v) for k, v in vars(self).items()}
        return f"ClusterCredentials({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _secret(inline: SecretStr | None, file: Path | None, name: str) -> str | None:
    """The secret from `opensearch.<name>` or `opensearch.<name>_file` (at most one may be set)."""
    if inline is not None and file is not None:
        raise CredentialsError(f"set either opensearch.{name} or opensearch.{name}_file, not both")
    if inline is not None:
        value = inline.get_secret_value()
        if not value.strip():
            raise CredentialsError(f"opensearch.{name} is empty")
        return value
    if file is None:
        return None
    try:
        value = Path(file).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise CredentialsError(f"cannot read opensearch.{name}_file {file}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"cannot read opensearch.{name}_file {file}: not UTF-8 text") from None
    if not value:
        raise CredentialsError(f"opensearch.{name}_file {file} is empty")
    return value


def resolve_cluster_credentials(cfg: OpenSearchSettings) -> ClusterCredentials:
    """One rule: inline secret and its *_file together is an error; an empty or unreadable secret is an
    error; username without password is an error; username/password and api_key together is an error.
    Errors are CredentialsError(ValueError) naming the setting (e.g. opensearch.password_file)."""
    password = _secret(cfg.password, cfg.password_file, "password")
    api_key = _secret(cfg.api_key, cfg.api_key_file, "api_key")
    username = cfg.username
    if username is not None and not username.strip():
        raise CredentialsError("opensearch.username is empty")
    if api_key is not None and (username is not None or password is not None):
        raise CredentialsError("set either opensearch.username/password or opensearch.api_key, not both")
    if username is not None and password is None:
        raise CredentialsError(
            "opensearch.username is set but no password (set opensearch.password or opensearch.password_file)"
        )
    if password is not None and username is None:
        raise CredentialsError("opensearch.password is set but opensearch.username is not")
    return ClusterCredentials(username=username, password=password, api_key=api_key)
