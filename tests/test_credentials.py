"""The one credential rule (middleware.credentials), with real secret files on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.backends.base import BackendError
from middleware.backends.opensearch_client import client_kwargs
from middleware.config import OpenSearchSettings
from middleware.credentials import ClusterCredentials, CredentialsError, resolve_cluster_credentials


def _file(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_no_credentials_is_anonymous() -> None:
    assert resolve_cluster_credentials(OpenSearchSettings()) == ClusterCredentials()


def test_inline_password(tmp_path: Path) -> None:
    got = resolve_cluster_credentials(OpenSearchSettings(username="shop", password="s3cret"))
    assert got == ClusterCredentials(username="shop", password="s3cret")


def test_password_file_is_stripped_of_its_newline(tmp_path: Path) -> None:
    cfg = OpenSearchSettings(username="shop", password_file=_file(tmp_path, "pw", "s3cret\n"))
    assert resolve_cluster_credentials(cfg) == ClusterCredentials(username="shop", password="s3cret")


def test_api_key_inline_and_from_file(tmp_path: Path) -> None:
    assert resolve_cluster_credentials(OpenSearchSettings(api_key="k3y")).api_key == "k3y"
    cfg = OpenSearchSettings(api_key_file=_file(tmp_path, "key", "  k3y-from-file \n"))
    assert resolve_cluster_credentials(cfg) == ClusterCredentials(api_key="k3y-from-file")


@pytest.mark.parametrize("name", ["password", "api_key"])
def test_inline_and_file_together_is_an_error_whichever_would_win(tmp_path: Path, name: str) -> None:
    fields = {name: "inline", f"{name}_file": _file(tmp_path, "s", "from-file")}
    if name == "password":
        fields["username"] = "shop"
    with pytest.raises(CredentialsError, match=rf"opensearch\.{name} or opensearch\.{name}_file, not both"):
        resolve_cluster_credentials(OpenSearchSettings(**fields))


@pytest.mark.parametrize("name", ["password", "api_key"])
@pytest.mark.parametrize("content", ["", "\n", "   \n\t"])
def test_empty_secret_file_is_an_error(tmp_path: Path, name: str, content: str) -> None:
    path = _file(tmp_path, "s", content)
    fields = {f"{name}_file": path, **({"username": "shop"} if name == "password" else {})}
    with pytest.raises(CredentialsError, match=rf"opensearch\.{name}_file .* is empty"):
        resolve_cluster_credentials(OpenSearchSettings(**fields))


@pytest.mark.parametrize("name", ["password", "api_key"])
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_inline_secret_is_an_error(name: str, value: str) -> None:
    fields = {name: value, **({"username": "shop"} if name == "password" else {})}
    with pytest.raises(CredentialsError, match=rf"opensearch\.{name} is empty"):
        resolve_cluster_credentials(OpenSearchSettings(**fields))


def test_unreadable_secret_files_are_errors_naming_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(CredentialsError, match=r"cannot read opensearch\.password_file .*missing"):
        resolve_cluster_credentials(OpenSearchSettings(username="shop", password_file=missing))
    with pytest.raises(CredentialsError, match=r"cannot read opensearch\.api_key_file"):
        resolve_cluster_credentials(OpenSearchSettings(api_key_file=tmp_path))  # a directory
    binary = _file(tmp_path, "bin", b"\xff\xfe\x00secret")
    with pytest.raises(CredentialsError, match=r"cannot read opensearch\.password_file .*not UTF-8"):
        resolve_cluster_credentials(OpenSearchSettings(username="shop", password_file=binary))


def test_username_without_password_is_an_error() -> None:
    with pytest.raises(CredentialsError, match=r"opensearch\.username is set but no password"):
        resolve_cluster_credentials(OpenSearchSettings(username="shop"))


def test_password_without_username_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"opensearch\.password is set but opensearch\.username is not"):
        resolve_cluster_credentials(OpenSearchSettings(password_file=_file(tmp_path, "pw", "s3cret")))


def test_basic_and_api_key_together_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"username/password or opensearch\.api_key, not both"):
        resolve_cluster_credentials(OpenSearchSettings(username="u", password="p", api_key="k"))
    cfg = OpenSearchSettings(
        username="u", password_file=_file(tmp_path, "pw", "p"), api_key_file=_file(tmp_path, "k", "k")
    )
    with pytest.raises(CredentialsError, match=r"not both"):
        resolve_cluster_credentials(cfg)


def test_errors_and_repr_never_show_the_secret(tmp_path: Path) -> None:
    cfg = OpenSearchSettings(username="u", password="s3cret-pw", api_key="s3cret-key")
    with pytest.raises(CredentialsError) as err:
        resolve_cluster_credentials(cfg)
    assert "s3cret" not in str(err.value)
    shown = repr(resolve_cluster_credentials(OpenSearchSettings(username="u", password="s3cret-pw")))
    assert "s3cret" not in shown and "'u'" in shown


def test_credentials_error_is_a_value_error() -> None:
    assert issubclass(CredentialsError, ValueError)


def test_client_kwargs_applies_the_rule(tmp_path: Path) -> None:
    """The OpenSearch client: Basic auth or an ApiKey header; rule violations become BackendError."""
    cfg = OpenSearchSettings(username="shop", password_file=_file(tmp_path, "pw", "s3cret\n"))
    assert client_kwargs(cfg)["http_auth"] == ("shop", "s3cret")
    key = client_kwargs(OpenSearchSettings(api_key_file=_file(tmp_path, "k", "k3y")))
    assert key["headers"] == {"Authorization": "ApiKey k3y"} and "http_auth" not in key
    anonymous = client_kwargs(OpenSearchSettings())
    assert "http_auth" not in anonymous and "headers" not in anonymous
    both = OpenSearchSettings(username="shop", password="inline", password_file=_file(tmp_path, "p2", "file"))
    with pytest.raises(BackendError, match=r"opensearch\.password or opensearch\.password_file, not both"):
        client_kwargs(both)
    with pytest.raises(BackendError, match=r"opensearch\.password_file .* is empty"):
        client_kwargs(OpenSearchSettings(username="shop", password_file=_file(tmp_path, "p3", "")))
