"""Communication accounting: the paper's bit convention and an honest payload count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ef21.compression.compressors import log2_ceil
from ef21.methods import Downlink, Message

PAPER_BITS_PER_VALUE = 32


def paper_bits(msg: Message) -> int:
    """32 bits per sent value, no index bits (the official code's convention)."""
    return PAPER_BITS_PER_VALUE * msg.vector.nnz


def payload_bits(msg: Message, selector: bool = False) -> int:
    """32 bits per value plus ⌈log2 d⌉ per index of a sparse vector, plus one bit for the selector of a method
    that sends one (EF21+ says in every message which candidate it kept, whichever it was)."""
    v = msg.vector
    per_entry = PAPER_BITS_PER_VALUE + (0 if v.is_dense else log2_ceil(v.dim))
    return per_entry * v.nnz + (1 if selector else 0)


def sends_selector(method: object) -> bool:
    """Whether a method's messages carry a selector bit (it says so with a true ``sends_selector``)."""
    return bool(getattr(method, "sends_selector", False))


@dataclass
class CommLedger:
    """Cumulative bits per worker, averaged over workers.

    The paper's figure excludes round 0 (the initialization) and counts no index bits; the payload figure
    includes both.
    """

    n: int
    selector: bool = False
    """Every message carries a 1-bit selector (``sends_selector``)."""
    paper_total: int = 0
    payload_total: int = 0
    down_total: int = 0
    """Downlink bits one worker received (every worker receives the same broadcast)."""

    def record(self, round_: int, messages: Sequence[Message | None]) -> None:
        """Count the messages a round used (None: left out, nothing counted)."""
        sent = [m for m in messages if m is not None]
        if round_ > 0:
            self.paper_total += sum(paper_bits(m) for m in sent)
        self.payload_total += sum(payload_bits(m, self.selector) for m in sent)

    def record_sizes(self, round_: int, sizes: Sequence[tuple[int, bool]], d: int) -> None:
        """``record`` from each sent message's (entries, dense) alone: what a master behind aggregators knows
        of the messages it received summed (``Update.covers``). The same bits as ``record`` of the messages."""
        if round_ > 0:
            self.paper_total += PAPER_BITS_PER_VALUE * sum(e for e, _ in sizes)
        self.payload_total += sum((PAPER_BITS_PER_VALUE + (0 if dense else log2_ceil(d))) * e
                                  + (1 if self.selector else 0) for e, dense in sizes)

    def record_down(self, round_: int, down: Downlink) -> None:
        """Count a round's broadcast in the paper's convention: 32 bits per value, round 0 excluded. Plain EF21
        sends the union of the workers' supports; EF21-BC its K entries; GD a dense vector."""
        if round_ > 0:
            self.down_total += PAPER_BITS_PER_VALUE * down.vector.nnz

    @property
    def bits_down_per_worker(self) -> float:
        return float(self.down_total)

    @property
    def bits_per_worker(self) -> float:
        return self.paper_total / self.n

    @property
    def payload_bits_per_worker(self) -> float:
        return self.payload_total / self.n
