"""``ef21 status``'s two ways in: the master's gRPC port (``--master HOST:PORT``) or its HTTP status port
(``--url http://HOST:PORT``), and what to say when the other kind of port answers.

``ef21 run`` prints both addresses, and people point ``--master`` at the status URL's port (gRPC then reports
"Failed parsing HTTP/2 (Expected SETTINGS frame …)") or ``--url`` at the gRPC port (HTTP/1.1 gets HTTP/2 bytes
back). Either way the other protocol is tried on the same port, and the error names the flag and address to use.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from urllib.parse import parse_qs, urlsplit

from ef21.errors import UserError
from ef21_worker.channel import ClientSecurity, open_channel

PROBE_TIMEOUT_S = 2.0


def split_url(url: str) -> tuple[str, str, str | None]:
    """'http://h:p/…#token=T' → ('http', 'h:p', 'T' or None). The status document is always at /status."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--url {url!r}: expected http://HOST:PORT or https://HOST:PORT (the status port)")
    token = parse_qs(parts.fragment).get("token", [None])[0]  # the dashboard's URL, pasted with its token
    return parts.scheme, parts.netloc, token


async def grpc_status(address: str, security: ClientSecurity, timeout: float) -> dict:
    from ef21_wire.v1 import ef21_pb2 as pb
    from ef21_wire.v1.ef21_pb2_grpc import MasterStub

    async with open_channel(address, security) as ch:
        reply = await MasterStub(ch).Status(pb.StatusRequest(), timeout=timeout, metadata=security.metadata())
        return json.loads(reply.json)


class _HTTPSConnection(http.client.HTTPSConnection):
    """Checks the certificate against ``server_name`` (--tls-server-name) instead of the dialled host."""

    def __init__(self, netloc: str, *, server_name: str | None, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(netloc, **kw)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name or self.host)


def http_get(scheme: str, netloc: str, path: str, security: ClientSecurity, timeout: float) -> tuple[int, bytes]:
    if scheme == "https":
        ctx = ssl.create_default_context(cafile=None if security.tls_ca is None else str(security.tls_ca))
        conn: http.client.HTTPConnection = _HTTPSConnection(netloc, server_name=security.tls_server_name,
                                                            timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(netloc, timeout=timeout)
    headers = {} if security.token is None else {"Authorization": f"Bearer {security.token}"}
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def fetch_url(url: str, security: ClientSecurity, timeout: float) -> dict:
    scheme, netloc, fragment_token = split_url(url)
    if security.token is None and fragment_token:
        security = ClientSecurity(security.tls_ca, security.tls_cert, security.tls_key, security.tls_server_name,
                                  fragment_token)
    try:
        code, body = http_get(scheme, netloc, "/status", security, timeout)
    except ssl.SSLError as exc:
        hint = (" (give the CA that signed the master's certificate with --tls-ca)"
                if isinstance(exc, ssl.SSLCertVerificationError)
                else f"; if the master has no TLS certificate its status port speaks plain HTTP: use --url "
                     f"http://{netloc}")
        raise UserError(f"cannot get the status from {url}: TLS failed ({exc.reason}){hint}") from None
    except (http.client.BadStatusLine, http.client.RemoteDisconnected, ConnectionResetError) as exc:
        raise UserError(_not_http(netloc, scheme, security, timeout, exc)) from None
    except OSError as exc:
        raise UserError(f"cannot get the status from {url}: {exc.strerror or exc}") from None
    if code == 401:
        raise UserError(f"{url} needs the run token (--status-token): give --token, --token-file or $EF21_TOKEN")
    try:
        doc = json.loads(body)
        if code != 200:
            raise UserError(f"{url}: HTTP {code}: {doc.get('error', '')}")
        if "run_id" not in doc:
            raise ValueError
        return doc
    except (ValueError, AttributeError):
        raise UserError(f"{url} answered HTTP {code} but not with an ef21 status document: is it the master's "
                        f"status port?") from None


def _not_http(netloc: str, scheme: str, security: ClientSecurity, timeout: float, exc: Exception) -> str:
    """The port did not answer HTTP/1.1: if it is the master's gRPC port, say so and how to use it."""
    what = f"{netloc} did not answer HTTP ({type(exc).__name__})"
    try:
        doc = asyncio.run(grpc_status(netloc, security, min(timeout, PROBE_TIMEOUT_S)))
    except Exception:  # not gRPC either (or not ours): say what we know
        return (what + ("; if the master uses TLS, use --url https://" + netloc if scheme == "http" else "") +
                "; is it the master's status port?")
    other = (doc.get("endpoints") or {}).get("status_url")
    return (f"{netloc} is the master's gRPC port, not its HTTP status port: use ef21 status --master {netloc}"
            + (f" (or --url {other})" if other else ""))


def fetch_grpc(address: str, security: ClientSecurity, timeout: float) -> dict:
    import grpc

    try:
        return asyncio.run(grpc_status(address, security, timeout))
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE and ("HTTP/2" in details or "http1" in details):
            raise UserError(_not_grpc(address, security, timeout)) from None
        raise UserError(f"cannot get the status of {address}: {exc.code().name}: {details}") from None


def _not_grpc(address: str, security: ClientSecurity, timeout: float) -> str:
    """The port answered HTTP/1.1, not gRPC: most likely the status port printed by ``ef21 run``."""
    for scheme in ("https", "http") if security.tls else ("http", "https"):
        try:
            code, body = http_get(scheme, address, "/status", security, min(timeout, PROBE_TIMEOUT_S))
        except (OSError, http.client.HTTPException):
            continue
        grpc_addr = None
        try:
            grpc_addr = (json.loads(body).get("endpoints") or {}).get("grpc")
        except (ValueError, AttributeError):
            pass
        return (f"{address} is the master's HTTP status port, not its gRPC port: use ef21 status --url "
                f"{scheme}://{address}" + (f" (or --master {grpc_addr})" if grpc_addr else
                                           " (or --master with the gRPC port: 'master HOST:PORT' in ef21 run's "
                                           "first line)") + (" [it answered HTTP 401: it needs the run token]"
                                                             if code == 401 else ""))
    return f"{address} answers HTTP/1.1, not gRPC: if it is the master's status port, use --url http://{address}"
