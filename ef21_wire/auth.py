"""The run token: where it comes from, and how it travels (``authorization: Bearer`` metadata)."""

from __future__ import annotations

import hmac
import os
import ssl
from pathlib import Path
from typing import Iterable

from ef21.errors import UserError

TOKEN_ENV = "EF21_TOKEN"
HEADER = "authorization"


def read_credential(path: Path, flag: str) -> bytes:
    """A certificate, key or CA file, or a one-line UserError naming the flag."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot read ({exc.strerror})") from None


def check_cert_and_key(cert: Path, key: Path, cert_flag: str = "--tls-cert", key_flag: str = "--tls-key") -> None:
    """A readable PEM certificate and its private key, or a one-line UserError. Checked here because gRPC's own
    loader only logs to stderr and then fails with a message about binding or connecting."""
    read_credential(cert, cert_flag)
    read_credential(key, key_flag)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise UserError(f"{cert_flag} {cert} / {key_flag} {key}: not a PEM certificate and its private key"
                        + (f" ({exc.reason})" if exc.reason else "")) from None


def check_ca(path: Path, flag: str = "--tls-ca") -> None:
    """A readable file of PEM CA certificates, or a one-line UserError."""
    read_credential(path, flag)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise UserError(f"{flag} {path}: no PEM certificate in it" + (f" ({exc.reason})" if exc.reason else "")) \
            from None


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """--token, else --token-file (e.g. a Docker/Kubernetes secret), else $EF21_TOKEN, else None."""
    if token and token_file:
        raise UserError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except PermissionError as exc:
            # In a container the reader's uid is often not the file owner's: say both (see docs/deployment.md, compose).
            try:
                st = token_file.stat()
                owner = f", the file belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:o}"
            except OSError:
                owner = ""
            raise UserError(f"--token-file {token_file}: cannot read ({exc.strerror}: this process runs as uid "
                            f"{os.getuid()}{owner})") from None
        except OSError as exc:
            raise UserError(f"--token-file {token_file}: cannot read ({exc.strerror})") from None
        if not token:
            raise UserError(f"--token-file {token_file} is empty")
    token = token or os.environ.get(TOKEN_ENV) or None
    return token


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if token is None else ((HEADER, f"Bearer {token}"),)


def token_matches(expected: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Constant-time check of the bearer token among call metadata."""
    for key, value in metadata or ():
        if key == HEADER:
            got = value.decode() if isinstance(value, bytes) else value
            return hmac.compare_digest(got.encode(), f"Bearer {expected}".encode())
    return False
