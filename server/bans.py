"""Who is charged for refused messages, and who may no longer join (``--max-faults``).

With mutual TLS a client is its certificate, so one misbehaving client loses only its own certificate's right to
join and honest workers on the same host (or behind the same NAT) go on. Without client certificates the host is
all the master can tell apart, so a ban locks out every worker there; the status and the log then say so plainly
whenever the run waits for a rank while a banned host keeps knocking.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from .session import Refusal

log = logging.getLogger("ef21.master")

RECENT_S = 300.0
"""A banned identity's refused join counts as "keeps knocking" for this long."""


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.5:4312' → 'ipv4:10.0.0.5' (the host a fault is charged to without client certificates)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def identity_of(context: Any, mutual_tls: bool) -> str:
    """The identity a gRPC call is charged to: its client certificate under mutual TLS, else its host."""
    if mutual_tls:
        auth = context.auth_context()
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        if pem:
            cn = (auth.get("x509_common_name") or [b"?"])[0].decode("utf-8", "replace")
            return f"certificate CN={cn} (sha256 {hashlib.sha256(pem).hexdigest()[:16]})"
    return f"host {peer_host(context.peer())}"


@dataclass
class _Record:
    faults: int = 0
    refused_joins: int = 0
    last_refused: float | None = None


class Bans:
    def __init__(self, max_faults: int) -> None:
        self.max_faults = max_faults
        self._records: dict[str, _Record] = {}

    def charge(self, identity: str) -> None:
        """A refused message from ``identity``."""
        rec = self._records.setdefault(identity, _Record())
        rec.faults += 1
        if rec.faults == self.max_faults:
            log.warning("%s is banned after %d bad messages (--max-faults %d): its workers may no longer join",
                        identity, rec.faults, self.max_faults)

    def banned(self, identity: str) -> bool:
        rec = self._records.get(identity)
        return rec is not None and rec.faults >= self.max_faults

    def admit(self, identity: str, waiting_ranks: Callable[[], list[int]]) -> None:
        """Refuse a banned identity's join (PERMISSION_DENIED), saying which ranks the run now waits for (asked
        only then: a join is O(1) whatever n, thousands of them O(n))."""
        if not self.banned(identity):
            return
        rec = self._records[identity]
        rec.refused_joins += 1
        rec.last_refused = time.time()
        waiting_now = waiting_ranks()
        waiting = f"; the run waits for rank(s) {_ranks(waiting_now)}" if waiting_now else ""
        log.warning("refused a worker from banned %s (%d bad messages, --max-faults %d)%s", identity, rec.faults,
                    self.max_faults, waiting)
        raise Refusal("PERMISSION_DENIED", f"{identity} sent {rec.faults} bad messages (--max-faults "
                                           f"{self.max_faults}); it may not rejoin this run")

    def note(self, waiting_ranks: list[int]) -> str:
        """What the status must add while ranks wait and banned identities were refused lately; "" otherwise."""
        if not waiting_ranks:
            return ""
        now = time.time()
        knocking = [(who, r) for who, r in self._records.items()
                    if r.faults >= self.max_faults and r.last_refused is not None
                    and now - r.last_refused <= RECENT_S]
        if not knocking:
            return ""
        who = "; ".join(f"{w} is banned (--max-faults {self.max_faults}) and {r.refused_joins} join(s) from it were "
                        f"refused" for w, r in knocking)
        return (f"rank(s) {_ranks(waiting_ranks)} wait for a worker while {who}: start the rank elsewhere, or "
                f"restart the master (with --resume) to lift the ban")

    def describe(self) -> list[dict]:
        now = time.time()
        return [{"identity": who, "faults": r.faults, "banned": r.faults >= self.max_faults,
                 "refused_joins": r.refused_joins,
                 "last_refused_ago_s": None if r.last_refused is None else round(now - r.last_refused, 3)}
                for who, r in sorted(self._records.items())]


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
