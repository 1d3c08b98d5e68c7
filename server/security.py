"""The master's side of security: TLS / mutual TLS for the gRPC port, and the run token."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from ef21.errors import UserError
from ef21_wire.auth import check_ca, check_cert_and_key, read_credential


@dataclass(frozen=True)
class ServerSecurity:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    """With a CA, clients must present a certificate it signed (mutual TLS)."""
    token: str | None = None
    """Run token every RPC must carry; None: no token."""
    status_token: bool = False
    """Also require the token on the HTTP status endpoint."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise UserError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.status_token and self.token is None:
            raise UserError("--status-token needs a run token (--token, --token-file or $EF21_TOKEN)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> None:
        """The certificate, key and CA are readable and valid, or a one-line UserError naming the flag."""
        if self.tls_cert is not None and self.tls_key is not None:
            check_cert_and_key(self.tls_cert, self.tls_key)
        if self.tls_ca is not None:
            check_ca(self.tls_ca)

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        assert self.tls_cert is not None and self.tls_key is not None
        self.check()
        ca = None if self.tls_ca is None else read_credential(self.tls_ca, "--tls-ca")
        return grpc.ssl_server_credentials(
            [(read_credential(self.tls_key, "--tls-key"), read_credential(self.tls_cert, "--tls-cert"))],
            root_certificates=ca, require_client_auth=ca is not None)

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """The status endpoint speaks HTTPS with the same certificate when TLS is on."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return ctx
