"""Can the master listen where it was told to? Asked before anything binds, so that a port in use or an unknown
host is one line naming the flag — gRPC's own failure is a C-core log line on stderr and a bare RuntimeError."""

from __future__ import annotations

import errno
import socket

from ef21.errors import UserError


def check_can_listen(host: str, port: int, flag: str, host_flag: str = "--host") -> None:
    """Bind (host, port) once and let go, or raise UserError. Port 0 (any free port) only checks the host."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"{host_flag} {host}: cannot resolve ({exc.strerror})") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            # Like the servers themselves: a port left in TIME_WAIT by a previous run is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise UserError(f"{flag} {port}: {host}:{port} is already in use (another master?)") from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise UserError(f"{host_flag} {host}: not an address of this machine") from None
                raise UserError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
