"""One worker stream's life on the master: its states, the one table of transitions between them, and the
messages each state accepts.

    connected ──Hello──▶ joined ──Setup──▶ set up ──Start──▶ running ──the run ends──▶ finished
        │                  │                  │                 │
        └──────────────────┴──────────────────┴─────────────────┴──▶ left | lost | refused

A stream is ``connected`` until its Hello is accepted; ``joined`` then holds a rank (Welcome sent); ``set up``
once its Setup is (it waits for the run's start, and may answer the master's requests for L: its Gram, the power
iteration's products); ``running`` once the master has sent it the state to start from. It ends ``finished`` (the run ended: Stop sent), ``left`` (the worker
said Leave), ``lost`` (the stream closed or broke) or ``refused`` (a message was refused). An end is final: the
stream is closed with its status code at once, its rank is unbound at once, and a rank that a stream held is
never that stream's again — only a new stream, through a new Hello, can take it. Nothing is ever sent to an ended
stream, and nothing it still sends is applied.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field

from ef21_wire.protocol import GRPC_FRAME_BYTES

from .session import Refusal, SetupInfo

log = logging.getLogger("ef21.master")


class StreamState(str, enum.Enum):
    CONNECTED = "connected"
    JOINED = "joined"
    SET_UP = "set_up"
    RUNNING = "running"
    FINISHED = "finished"
    LEFT = "left"
    LOST = "lost"
    REFUSED = "refused"

    def __str__(self) -> str:
        return self.value


S = StreamState
ENDS = frozenset({S.FINISHED, S.LEFT, S.LOST, S.REFUSED})
"""The terminal states."""

TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    S.CONNECTED: frozenset({S.JOINED}) | ENDS,
    S.JOINED: frozenset({S.SET_UP}) | ENDS,
    S.SET_UP: frozenset({S.RUNNING}) | ENDS,
    S.RUNNING: ENDS,
    **{end: frozenset() for end in ENDS},
}
"""Every allowed move; anything else is a bug in the master (``IllegalTransition``), never a peer's doing."""

ACCEPTS: dict[StreamState, frozenset[str]] = {
    S.CONNECTED: frozenset({"hello"}),
    S.JOINED: frozenset({"setup", "leave"}),
    S.SET_UP: frozenset({"power_reply", "gram_reply", "leave"}),
    S.RUNNING: frozenset({"update", "eval", "resync_request", "leave"}),
    **{end: frozenset() for end in ENDS},
}
"""The WorkerMessage kinds each state takes; any other is refused with FAILED_PRECONDITION."""

END_CODES: dict[StreamState, str] = {S.FINISHED: "OK", S.LEFT: "CANCELLED", S.LOST: "UNAVAILABLE"}
"""The gRPC status a stream closes with (``refused``: the refusal's own code). ``finished`` is OK: its Stop said
why. ``left`` is CANCELLED, the code for an operation its caller gave up, with the reason in the details (gRPC
carries no details with OK), so that whatever the stream still sends is answered clearly."""


class IllegalTransition(RuntimeError):
    """The master tried a move the table does not allow: a bug, reported loudly."""


@dataclass(frozen=True)
class StreamEnd:
    state: StreamState
    code: str
    """gRPC status code name."""
    message: str


@dataclass(eq=False)
class WorkerStream:
    """A Train stream as the master sees it, from its first byte to its end. ``outbox`` carries serialized
    MasterMessages to the stream's writer; None tells the writer the stream has ended (see ``end``)."""

    peer: str
    identity: str
    """Who the stream is charged to: its client certificate under mutual TLS, else its host."""
    rank: int | None = None
    hostname: str = ""
    state: StreamState = S.CONNECTED
    end: StreamEnd | None = None
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    rounds_done: int = 0
    late: int = 0
    """Messages that arrived after their round had closed without this worker."""
    bytes_up: int = 0
    """Everything this worker's stream carried up (Hello, Setup, Updates, Evals, …), each message as serialized plus
    gRPC's 5-byte prefix: its set-up and evaluations included, unlike the run's round traffic (``wire_bytes_up``)."""
    bytes_down: int = 0
    """Everything sent down this stream (Welcome, Start, RoundResults, …), counted the same way."""
    last_error: str = ""
    """Why the worker left, when it said so (its objective failed)."""
    setup: SetupInfo | None = None
    sends_after_end: int = 0
    """Sends the master attempted after the end (dropped): always 0 unless the master has a bug."""
    outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)

    @property
    def ended(self) -> bool:
        return self.state in ENDS

    def move(self, new: StreamState) -> None:
        """The one place a stream changes state (ends go through ``finish``)."""
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"stream of {self.peer} (rank {self.rank}): {self.state} → {new}")
        self.state = new

    def finish(self, state: StreamState, message: str, code: str | None = None) -> bool:
        """End the stream (a terminal state) with its status; the writer closes it. False if it had ended."""
        if self.ended:
            return False
        self.move(state)
        self.end = StreamEnd(state, code or END_CODES[state], message)
        self.outbox.put_nowait(None)
        return True

    def check_accepts(self, kind: str | None) -> None:
        """Refuse a message its state does not take (the stream then ends ``refused``)."""
        if kind is None:
            raise Refusal("INVALID_ARGUMENT", "empty WorkerMessage (no kind set)")
        if kind not in ACCEPTS[self.state]:
            if self.state is S.CONNECTED:
                raise Refusal("FAILED_PRECONDITION", f"first message must be Hello, got {kind}")
            who = "" if self.rank is None else f" (rank {self.rank})"
            raise Refusal("FAILED_PRECONDITION", f"{kind} is not allowed on a stream that is {self.state}{who}")

    def send(self, raw: bytes) -> None:
        if self.ended:
            # Never sent: the stream's end is already on its way to the peer.
            self.sends_after_end += 1
            log.error("bug: a message for the %s stream of rank %s was dropped", self.state, self.rank)
            return
        self.bytes_down += len(raw) + GRPC_FRAME_BYTES
        self.outbox.put_nowait(raw)

    def received(self, raw: bytes) -> None:
        """A message of this stream arrived: count it and note the time."""
        self.bytes_up += len(raw) + GRPC_FRAME_BYTES
        self.last_seen = time.time()

    def describe(self) -> dict:
        now = time.time()
        return {
            "rank": self.rank,
            "address": self.peer,
            "hostname": self.hostname,
            "state": str(self.state),
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "last_seen_ago_s": round(now - self.last_seen, 3),
            "rounds_done": self.rounds_done,
            "late_messages": self.late,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "last_error": self.last_error or None,
            "ended": None if self.end is None else f"{self.end.code}: {self.end.message}",
        }
