"""What the operating system lets a master (or an aggregator) hold: open files, one per connection.

Every worker (or aggregator) connection is a socket, and a socket is a file descriptor. Linux gives a process a
soft limit (RLIMIT_NOFILE, often 1024) that it may raise itself up to the hard limit, which only the
administrator can raise (``ulimit -Hn``, systemd's ``LimitNOFILE=``, Docker's ``--ulimit nofile=``, Kubernetes:
the container runtime's default). A master that runs out of descriptors cannot accept connections: gRPC logs the
failed ``accept`` and retries, the workers time out connecting, and the run waits for them until
``--join-timeout``. So the master raises its soft limit to the hard one at start, and refuses at once, with one
line, a run that needs more than the hard limit allows (exit 2).
"""

from __future__ import annotations

import logging
import resource

from ef21.errors import UserError

log = logging.getLogger("ef21.master")

SPARE_FDS = 64
"""Descriptors a master needs besides its peers' sockets: the listening sockets, the status endpoint and its
clients, the log, checkpoints, gRPC's own event fds, Python's imports."""


def raise_open_files() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. a hard limit above the kernel's nr_open
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
        else:
            if target != soft:
                log.info("open-files limit raised from %d to %d (the hard limit)", soft, target)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_open_files(peers: int, what: str, flag: str) -> int:
    """Raise the soft limit, then refuse (UserError) when ``peers`` connections and the spare descriptors do not
    fit in it. Returns the limit."""
    limit = raise_open_files()
    need = peers + SPARE_FDS
    if limit != resource.RLIM_INFINITY and limit < need:
        raise UserError(
            f"{flag} {peers} needs about {need} open files (one socket per {what}, plus {SPARE_FDS}) but this "
            f"process may open {limit} (RLIMIT_NOFILE hard limit): raise it (ulimit -Hn, systemd LimitNOFILE=, "
            f"docker --ulimit nofile=N:N)")
    return limit
