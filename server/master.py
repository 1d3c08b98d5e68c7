"""The master process: gRPC service + status endpoint + round engine, with a two-phase shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass
from typing import Callable

from ef21.engine.records import RoundRecord
from ef21.errors import UserError

from .coordinator import Coordinator, MasterOptions
from .grpc_server import build_server
from .history import History
from .limits import check_open_files
from .listen import check_can_listen
from .metrics import CONTENT_TYPE, RoundObserver, make_registry, render
from .security import ServerSecurity
from .service import MasterService, max_worker_message_bytes
from .status_doc import status_document
from .status_http import StatusHTTPServer
from .streams import StreamState

log = logging.getLogger("ef21.master")


@dataclass(frozen=True)
class ListenOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    status_host: str | None = None
    """Defaults to ``host``."""
    status_port: int | None = 8080
    """None: no HTTP status endpoint."""
    drain_s: float = 5.0
    """Grace period for streams to deliver Stop before the server is cancelled."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Master:
    def __init__(self, opts: MasterOptions, listen: ListenOptions, *, security: ServerSecurity | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None) -> None:
        self.listen = listen
        self.security = security or ServerSecurity()
        self._on_round = on_round
        self.coord = Coordinator(opts, on_round=self._observe)
        # After the run's own checks (its data must split over the workers first), before any socket is open.
        check_open_files(self.coord.n, "worker", "--workers")
        # The dashboard's curves and the round distributions in /metrics: fed once per round, after its downlink.
        self.history = History()
        self.observer = RoundObserver(self.coord.n)
        self.registry = make_registry(self.coord, self.observer)
        self.service = MasterService(self.coord, self.status, token=self.security.token,
                                     mutual_tls=self.security.tls_ca is not None)
        d = self.coord.d
        credentials = self.security.grpc_credentials()
        self._check_ports()
        try:
            self.server, self.port = build_server(
                self.service.handler(), f"{listen.host}:{listen.port}", credentials=credentials,
                max_message=None if d is None else max_worker_message_bytes(d), peers=self.coord.n)
        except OSError as exc:
            raise UserError(f"--port {listen.port}: {exc}") from None
        self.http: StatusHTTPServer | None = None
        if listen.status_port is not None:
            self.http = StatusHTTPServer(
                self.status, listen.status_host or listen.host, listen.status_port,
                token=self.security.token if self.security.status_token else None,
                ssl=self.security.http_ssl_context(),
                metrics=lambda: (render(self.registry), CONTENT_TYPE), history=self.history.to_json)
        self._engine: asyncio.Task | None = None
        self._stopping = False

    def status(self) -> dict:
        """The status document (``GET /status``, the ``Status`` call, ``ef21 status``)."""
        return status_document(self.coord)

    def _observe(self, rec: RoundRecord) -> None:
        self.history.add(rec)
        self.observer.observe(rec)
        if self._on_round is not None:
            self._on_round(rec)

    @property
    def status_url(self) -> str | None:
        """The dashboard's URL (``/status``, ``/metrics`` … beside it), once the status endpoint listens."""
        if self.http is None:
            return None
        host = self.listen.status_host or self.listen.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"{'https' if self.security.tls else 'http'}://{host}:{self.http.port}/"
    def _check_ports(self) -> None:
        lo = self.listen
        check_can_listen(lo.host, lo.port, "--port")
        if lo.status_port is not None:
            status_host = lo.status_host or lo.host
            if lo.status_port == lo.port != 0 and status_host == lo.host:
                raise UserError(f"--status-port {lo.status_port} is the gRPC port too; give them different ports")
            check_can_listen(status_host, lo.status_port, "--status-port",
                             "--host" if lo.status_host is None else "--status-host")

    @property
    def address(self) -> str:
        return f"{self.listen.host}:{self.port}"

    async def start(self) -> None:
        if not is_loopback(self.listen.host) and not self.security.tls:
            log.warning("listening on %s without TLS: traffic%s is readable on the network%s", self.address,
                        " and the run token" if self.security.token else "",
                        "" if self.security.token else " and anyone who can reach this port can join the run")
        try:
            if self.http is not None:
                await self.http.start()
            await self.server.start()
        except OSError as exc:  # lost a race for a port checked free a moment ago
            await self.server.stop(None)
            if self.http is not None:
                await self.http.stop()
            raise UserError(f"cannot listen: {exc.strerror or exc}") from None
        self.coord.endpoints = {"grpc": self.address}
        if self.status_url is not None:
            self.coord.endpoints["status_url"] = self.status_url
        self._engine = asyncio.create_task(self.coord.run(), name="round-engine")
        log.info("master listening on %s%s", self.address,
                 "" if self.http is None else f", dashboard on {self.status_url} (and /status, /metrics)")

    async def wait(self) -> None:
        """Until the run ends (done or failed)."""
        await self.coord.done.wait()

    async def shutdown(self) -> None:
        """Idempotent: end the run if it is still going, let streams deliver Stop, then stop serving."""
        if self._stopping:
            return
        self._stopping = True
        if self._engine is not None and not self._engine.done():
            self._engine.cancel()
            try:
                await self._engine
            except asyncio.CancelledError:
                pass
        await self.server.stop(self.listen.drain_s)
        if self.http is not None:
            await self.http.stop()

    def _farewell_s(self) -> float:
        """How long an ended run keeps serving before the process exits: while a rank's last stream broke before
        its Stop went out, the drain's grace (``ListenOptions.drain_s``, 5 s): a worker cut off near the end that
        comes back in that time is told the run is over and exits 0, instead of retrying until its
        --connect-timeout; else not at all."""
        cut_off = [r for r, s in self.coord.sessions.items() if s.state is StreamState.LOST]
        if cut_off:
            log.info("run ended with rank(s) %s cut off: telling whoever comes back within %g s",
                     ", ".join(map(str, cut_off)), self.listen.drain_s)
            return self.listen.drain_s
        return 0.0

    async def serve(self, *, linger: bool = False) -> int:
        """Run to the end; SIGTERM/SIGINT end the run early (workers are told to stop). Exit status.

        ``linger``: once the run has ended, keep serving (the status, and the run's end to workers that come
        late) until a signal — for schedulers that restart a process that exits (a Kubernetes StatefulSet)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await self.start()
        done = asyncio.create_task(self.wait())
        signalled = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({done, signalled}, return_when=asyncio.FIRST_COMPLETED)
            if linger and not stop.is_set():
                log.info("run %s; serving its status until stopped (--linger)", self.coord.state)
                await signalled
            elif not stop.is_set():
                await asyncio.wait({signalled}, timeout=self._farewell_s())
        finally:
            done.cancel()
            signalled.cancel()
            await self.shutdown()
        if stop.is_set() and self.coord.state == "stopped":
            log.info("master stopped by signal at round %d", self.coord.round)
            return 0
        return 0 if self.coord.state == "done" else 1
