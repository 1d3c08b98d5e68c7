"""The master's read-only HTTP endpoint: the dashboard (``/``), ``/status`` (JSON), ``/history?since=ROUND``
(the dashboard's curves), ``/metrics`` (Prometheus) and ``/healthz``.

Plain asyncio, HTTP/1.1, one request per connection. It shares the event loop with the rounds, so nothing here
may wait on a client: it reads at most a few KiB, gives up on a client slower than ``READ_TIMEOUT_S`` (reading
or being written to), serves at most ``MAX_CONNECTIONS`` at once, and every reply is built from memory in well
under a millisecond.

With ``--status-token`` the data paths need ``Authorization: Bearer TOKEN``; the page and its static files do
not (they hold no run data), and the page sends the token it was given in its URL fragment (``/#token=…``,
which browsers never send to the server) with each of its requests. ``/healthz`` needs no token either: probes
(Docker, Kubernetes) carry none, and it tells only whether the master is up and its run not failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl as ssl_module
from importlib import resources
from typing import Callable
from urllib.parse import parse_qs

from ef21_wire.auth import token_matches

log = logging.getLogger("ef21.master")

MAX_HEADER_BYTES = 8192
READ_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 64
JSON_TYPE = "application/json"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", "": "text/plain; charset=utf-8"}
PAGE_HEADERS = ("Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'; "
                "img-src 'self' data:; frame-ancestors 'none'\r\nX-Content-Type-Options: nosniff\r\n"
                "Referrer-Policy: no-referrer\r\n")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}
PATHS = "/ (dashboard), /status, /history?since=ROUND, /metrics, /healthz"


def load_static() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files, read once: URL path → (body, content type)."""
    root = resources.files("ef21_server") / "static"
    out: dict[str, tuple[bytes, str]] = {}
    for folder, prefix in ((root, "/static/"), (root / "vendor", "/static/vendor/")):
        for f in folder.iterdir():
            if f.is_file() and not f.name.endswith(".json"):
                suffix = f.name[f.name.rfind("."):] if "." in f.name else ""
                out[prefix + f.name] = (f.read_bytes(), STATIC_TYPES.get(suffix, STATIC_TYPES[""]))
    out["/"] = out.pop("/static/index.html")
    return out


def _json_bytes(doc: object) -> bytes:
    try:
        return json.dumps(doc, indent=1, allow_nan=False).encode()
    except ValueError:  # a diverging run has inf/NaN figures: JSON has neither, so they go out as null
        return json.dumps(_no_nan(doc), indent=1).encode()


def _no_nan(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_no_nan(x) for x in v]
    return v


class StatusHTTPServer:
    """``token``: when set, data requests must carry ``Authorization: Bearer TOKEN``. ``ssl``: serve HTTPS.
    ``metrics``: the Prometheus exposition and its content type; ``history``: the curves after a round, as JSON."""

    def __init__(self, status: Callable[[], dict], host: str, port: int, *, token: str | None = None,
                 ssl: ssl_module.SSLContext | None = None,
                 metrics: Callable[[], tuple[bytes, str]] | None = None,
                 history: Callable[[int], bytes] | None = None) -> None:
        self._status = status
        self._metrics = metrics
        self._history = history
        self._host, self._port = host, port
        self._token = token
        self._ssl = ssl
        self._static = load_static()
        self._server: asyncio.base_events.Server | None = None
        self._open = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port, limit=MAX_HEADER_BYTES,
                                                  ssl=self._ssl, ssl_handshake_timeout=READ_TIMEOUT_S
                                                  if self._ssl is not None else None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                # Refused without reading: a flood of idle connections must not grow without bound.
                await self._reply(writer, 503, _json_bytes({"error": "too many connections"}))
                return
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            await self._route(head, writer)
        except asyncio.TimeoutError:
            # A client too slow to send its request or to take the reply: drop the connection and whatever
            # is still buffered for it (a plain close would keep both until the client reads).
            writer.transport.abort()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl_module.SSLError):
            pass
        except Exception:  # the status page must never take the master down
            log.exception("status endpoint error")
        finally:
            self._open -= 1
            writer.close()

    async def _route(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return await self._reply(writer, 400, _json_bytes({"error": "bad request line"}))
        method, target = parts[0], parts[1]
        path, _, query = target.partition("?")
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return await self._reply(writer, 405, _json_bytes({"error": "read-only endpoint: GET only"}))
        if path in self._static:
            body, ctype = self._static[path]
            return await self._reply(writer, 200, body, ctype, head_only=head_only, extra=PAGE_HEADERS)
        if self._token is not None and path != "/healthz" and not self._authorized(head):
            log.warning("unauthenticated status request from %s", writer.get_extra_info("peername"))
            return await self._reply(writer, 401, _json_bytes({"error": "missing or wrong run token"}),
                                     extra='WWW-Authenticate: Bearer realm="ef21"\r\n')
        if path == "/status":
            await self._reply(writer, 200, _json_bytes(self._status()), head_only=head_only)
        elif path == "/healthz":
            doc = self._status()
            ok = doc["state"] != "failed"
            await self._reply(writer, 200 if ok else 503, _json_bytes({"ok": ok, "state": doc["state"]}),
                              head_only=head_only)
        elif path == "/metrics" and self._metrics is not None:
            body, ctype = self._metrics()
            await self._reply(writer, 200, body, ctype, head_only=head_only)
        elif path == "/history" and self._history is not None:
            try:
                since = int(parse_qs(query).get("since", ["-1"])[0])
            except ValueError:
                return await self._reply(writer, 400, _json_bytes({"error": "since must be a round number"}))
            await self._reply(writer, 200, self._history(since), head_only=head_only)
        else:
            await self._reply(writer, 404, _json_bytes({"error": f"no such path {path}; try {PATHS}"}))

    def _authorized(self, head: bytes) -> bool:
        assert self._token is not None
        headers = []
        for raw in head.split(b"\r\n")[1:]:
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return token_matches(self._token, headers)

    async def _reply(self, writer: asyncio.StreamWriter, code: int, body: bytes, ctype: str = JSON_TYPE, *,
                     head_only: bool = False, extra: str = "") -> None:
        writer.write(
            f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n".encode()
        )
        if not head_only:
            writer.write(body)
        # A client that does not read is given up on; the write buffer it leaves is dropped with the connection.
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
