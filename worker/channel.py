"""The worker's gRPC channel: options, TLS / mutual TLS, and the run token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from ef21.errors import UserError
from ef21_wire.auth import check_ca, check_cert_and_key, read_credential, token_metadata

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    # Liveness, chosen from measurements (benchmarks/liveness.py; docs: Running it for real, faults): both sides
    # ping every 2 s and give a connection up 4 s after an unanswered ping (gRPC also sets TCP_USER_TIMEOUT to
    # 4 s: data unacknowledged that long ends it too), so master and worker each notice a silent peer within
    # 4-6 s, within 6 s of each other. Measured: a stream whose peer is black-holed fails after 6.4 s on both
    # sides; a 4 MB message crossing a 1 Mbit/s link (35 s) and 60 s of 3 % loss with 30-50 ms of jitter keep
    # the stream alive; a process busy in pure Python for 12 s still answers (gRPC acks pings off the GIL).
    # The master's min_ping_interval (1 s) is below 2 s, so it never answers too_many_pings.
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 4_000),
    ("grpc.keepalive_permit_without_calls", 1),  # between the Join and the stream there is no call
    ("grpc.http2.max_pings_without_data", 0),  # the default (2) would stop the pings while a round is quiet
    # Reconnecting: gRPC's defaults wait up to 120 s between connection attempts and 20 s for one; a worker
    # whose link returns would sit out that backoff. Attempts every second at most, each given up after 2 s.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.min_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


def _read(path: Path | None, flag: str) -> bytes | None:
    return None if path is None else read_credential(path, flag)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client (worker, ``ef21 status``) reaches the master: plaintext, TLS, or mutual TLS; with a token."""

    tls_ca: Path | None = None
    """CA that signed the master's certificate; turns TLS on."""
    tls_cert: Path | None = None
    """This client's certificate, for mutual TLS (with ``tls_key``)."""
    tls_key: Path | None = None
    tls_server_name: str | None = None
    """Name to expect in the master's certificate when it differs from the dialled host."""
    token: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def check(self) -> None:
        """Certificates and key readable and valid, or a one-line UserError naming the flag (gRPC's own loader
        only logs to stderr, and the worker would then report an unreachable master)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None:
            check_ca(self.tls_ca)
        if self.tls_cert is not None and self.tls_key is not None:
            check_cert_and_key(self.tls_cert, self.tls_key)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return token_metadata(self.token)

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca"),
            private_key=_read(self.tls_key, "--tls-key"),
            certificate_chain=_read(self.tls_cert, "--tls-cert"),
        )


def open_channel(target: str, security: ClientSecurity | None = None) -> grpc.aio.Channel:
    security = security or ClientSecurity()
    if not security.tls:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    options = list(CHANNEL_OPTIONS)
    if security.tls_server_name:
        options.append(("grpc.ssl_target_name_override", security.tls_server_name))
    return grpc.aio.secure_channel(target, security.credentials(), options=options)


def add_client_security_args(p) -> None:  # type: ignore[no-untyped-def]
    g = p.add_argument_group("security")
    g.add_argument("--tls-ca", type=Path, default=None, help="CA certificate of the master (turns TLS on)")
    g.add_argument("--tls-cert", type=Path, default=None, help="client certificate, for mutual TLS")
    g.add_argument("--tls-key", type=Path, default=None, help="client private key, for mutual TLS")
    g.add_argument("--tls-server-name", default=None, help="name in the master's certificate, if not the host")
    g.add_argument("--token", default=None, help="run token (default: $EF21_TOKEN)")
    g.add_argument("--token-file", type=Path, default=None, help="read the run token from a file (a secret)")


def client_security_from_args(ns) -> ClientSecurity:  # type: ignore[no-untyped-def]
    from ef21_wire.auth import resolve_token

    security = ClientSecurity(ns.tls_ca, ns.tls_cert, ns.tls_key, ns.tls_server_name,
                              resolve_token(ns.token, ns.token_file))
    security.check()
    return security
