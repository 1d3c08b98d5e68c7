"""A read-only HTTP endpoint: GET /status (JSON) and GET /healthz. Plain asyncio, HTTP/1.1, one request per
connection; it reads at most a few KiB from a client and gives up on slow ones. With a token, /status requires it
and /healthz does not (see ``_handle``)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl as ssl_module
from typing import Callable

from ef21_wire.auth import token_matches

log = logging.getLogger("ef21.master")

MAX_HEADER_BYTES = 8192
READ_TIMEOUT_S = 5.0


class StatusHTTPServer:
    """``token``: when set, requests must carry ``Authorization: Bearer TOKEN``. ``ssl``: serve HTTPS."""

    def __init__(self, status: Callable[[], dict], host: str, port: int, *, token: str | None = None,
                 ssl: ssl_module.SSLContext | None = None) -> None:
        self._status = status
        self._host, self._port = host, port
        self._token = token
        self._ssl = ssl
        self._server: asyncio.base_events.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port, limit=MAX_HEADER_BYTES,
                                                  ssl=self._ssl)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            # /healthz answers without the token: probes (Docker, Kubernetes) carry none, and it tells only
            # whether the master is up and its run not failed.
            health = len(parts) == 3 and parts[1].split("?", 1)[0] == "/healthz"
            if len(parts) != 3:
                await self._reply(writer, 400, {"error": "bad request line"})
            elif self._token is not None and not health and not self._authorized(head):
                log.warning("unauthenticated status request from %s", writer.get_extra_info("peername"))
                await self._reply(writer, 401, {"error": "missing or wrong run token"})
            elif parts[0] not in ("GET", "HEAD"):
                await self._reply(writer, 405, {"error": "read-only endpoint: GET only"})
            else:
                path = parts[1].split("?", 1)[0]
                if path == "/status":
                    await self._reply(writer, 200, self._status(), head_only=parts[0] == "HEAD")
                elif path == "/healthz":
                    doc = self._status()
                    ok = doc["state"] != "failed"
                    await self._reply(writer, 200 if ok else 503, {"ok": ok, "state": doc["state"]},
                                      head_only=parts[0] == "HEAD")
                else:
                    await self._reply(writer, 404, {"error": f"no such path {path}; try /status or /healthz"})
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # the status page must never take the master down
            log.exception("status endpoint error")
        finally:
            writer.close()

    def _authorized(self, head: bytes) -> bool:
        assert self._token is not None
        headers = []
        for raw in head.split(b"\r\n")[1:]:
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return token_matches(self._token, headers)

    async def _reply(self, writer: asyncio.StreamWriter, code: int, doc: dict, head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[code]
        body = json.dumps(doc, indent=1).encode()
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
        )
        if not head_only:
            writer.write(body)
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
