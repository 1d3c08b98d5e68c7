"""The round in progress: who is asked (sampled participation), what has come in, when the round may close
(everyone, or a timeout with enough contributions), and who was left out of which round. Messages are checked
here against the round they claim before they reach any state."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ef21.compression.sparse import SparseVector
from ef21.engine.nodes import is_eval_round, sends_eval_grad
from ef21.engine.tree import Tree
from ef21.methods import Message
from ef21.methods.participation import participants
from ef21_wire.fastwire import UpdateIn
from ef21_wire.v1 import ef21_pb2 as pb

from .session import EvalInfo, Refusal
from .streams import StreamState, WorkerStream

Decode = Callable[..., SparseVector]


@dataclass(frozen=True)
class RoundRules:
    """How rounds close, fixed for a run."""

    n: int
    rounds: int
    eval_every: int
    round_timeout: float | None
    """Close without the workers that have not delivered after this many seconds (methods that tolerate it)."""
    min_workers: int
    tolerates_missing: bool
    seed: int
    eval_grad: bool = False
    """--eval-grad: every Eval carries the dense gradient, even an objective's that reports metrics."""
    tol: float = 0.0


@dataclass(frozen=True)
class ClosedRound:
    """What a closed round leaves for the log and the fold."""

    messages: list[Message | None]
    """In rank order; None for a rank left out."""
    missing: list[int]
    """Every rank left out (not sampled, or a straggler)."""
    dropped: list[int]
    """Sampled ranks that did not deliver (the RoundResult names only these: every worker draws the sample)."""
    up_bytes: list[int]
    evals: list[EvalInfo] | None
    """Every rank's evaluation, on an evaluation round that nobody was dropped from."""
    eval_bytes: int
    sizes: list[tuple[int, bool]] | None = None
    """Through aggregators: (entries, dense) of every delivered rank's message, in rank order (``messages`` are
    then the tree's: the block sums, ``ef21.engine.tree``)."""
    carriers: dict[int, list[int]] | None = None
    """Through aggregators: the stream (rank) each block's sum came on → the ranks it covers."""


class RoundBook:
    def __init__(self, rules: RoundRules) -> None:
        self.rules = rules
        self.participation: int | None = None  # sampled participation's count, once the plan is known
        self.updates: dict[int, tuple[Message, int]] = {}
        # Through aggregators (--aggregators F): the tree, and this round's block sums (block → (carrier rank,
        # covered ranks, sum)) and each covered rank's (entries, dense); ``updates`` holds the sum at its carrier.
        self.tree: Tree | None = None
        self.blocks: dict[int, tuple[int, list[int], Message]] = {}
        self.sizes: dict[int, tuple[int, bool]] = {}
        self.last_in: dict[int, int] = {}  # rank → the last round its message was taken in
        self.evals: dict[int, EvalInfo] = {}
        self.missing_in: dict[int, list[int]] = {}  # round → ranks dropped (for late messages)
        self.missed_streak: dict[int, int] = {}  # rank → consecutive rounds left out
        self.late_messages = 0
        self.max_entries = 0  # the most entries the compressor puts in a message (set with the method)
        self.buffer_size = 0  # a model's buffers (0: none; set with the plan)
        self.g0_ranks: set[int] = set()  # ranks whose next Update may be the uncompressed g_i⁰ (d entries)
        # Rounds whose Updates are whole gradients for every rank (MARINA's coin), from the method; None: no such.
        self.dense_rounds: Callable[[int], bool] | None = None
        self.started_at = time.monotonic()
        self._asked: tuple[int, int | None, frozenset[int] | None] | None = None  # (t, participation, chosen(t))

    # -- who is asked ----------------------------------------------------------------------------------------

    def is_eval_round(self, t: int) -> bool:
        return is_eval_round(t, self.rules.eval_every, self.rules.rounds)

    def chosen(self, t: int) -> frozenset[int] | None:
        # Asked for every message of a round: the draw is made once per round.
        asked = self._asked
        if asked is None or asked[0] != t or asked[1] != self.participation:
            asked = self._asked = (t, self.participation,
                                   participants(self.rules.seed, t, self.rules.n, self.participation))
        return asked[2]

    def sampled(self, rank: int, t: int) -> bool:
        """Whether sampled participation (EF21-PP) asks ``rank`` for an Update in round t."""
        chosen = self.chosen(t)
        return chosen is None or rank in chosen

    def expected(self, t: int) -> list[int]:
        chosen = self.chosen(t)
        return list(range(self.rules.n)) if chosen is None else sorted(chosen)

    # -- what comes in -----------------------------------------------------------------------------------------

    def counts(self, s: WorkerStream, round_: int, t: int, what: str, run_state: str) -> bool:
        """Whether a message about ``round_`` counts in round t; False for a straggler's message of a round that
        closed without it (counted, dropped)."""
        if run_state != "running" or s.state is not StreamState.RUNNING:
            raise Refusal("FAILED_PRECONDITION", f"{what} while the run is {run_state} and the worker {s.state}")
        if round_ < t and (s.rank in self.missing_in.get(round_, ()) or (what == "Eval" and round_ == t - 1)):
            # A straggler's message of a round that closed without it (or closed on the timeout before its
            # evaluation arrived): expected with --round-timeout, counted, and dropped.
            self.late_messages += 1
            s.late += 1
            return False
        if round_ != t:
            raise Refusal("FAILED_PRECONDITION", f"{what} for round {round_}, but the current round is {t}")
        return True

    def update(self, s: WorkerStream, msg: UpdateIn, nbytes: int, t: int, d: int, decode: Decode,
               sessions: dict[int, WorkerStream] | None = None) -> None:
        if self.tree is not None or msg.covers:
            self._block_sum(s, msg, nbytes, t, d, decode, sessions or {})
            return
        if s.rank in self.updates:
            raise Refusal("FAILED_PRECONDITION", f"second Update from rank {s.rank} for round {msg.round}")
        if not self.sampled(s.rank, t):
            raise Refusal("FAILED_PRECONDITION", f"Update from rank {s.rank}, which round {msg.round}'s sampled "
                                                 f"participation leaves out")
        dense = s.rank in self.g0_ranks or (self.dense_rounds is not None and self.dense_rounds(t))
        vec = decode(msg.vector, f"Update round {msg.round}", max_nnz=d if dense else self.max_entries)
        self.updates[s.rank] = (Message(vec, msg.replace, self._buffers(msg, decode)), nbytes)

    def _block_sum(self, s: WorkerStream, msg: UpdateIn, nbytes: int, t: int, d: int, decode: Decode,
                   sessions: dict[int, WorkerStream]) -> None:
        """An aggregator's sum over ranks of one block. Everything it claims is checked before anything is kept:
        the ranks, in increasing order and each once, are of one block of the tree, start with the stream's own,
        are held by workers whose streams come through this same aggregator (its connection: the same peer), were
        asked this round and have not been summed already (by this message, another aggregator or a
        straggler's)."""
        tree = self.tree
        if tree is None:
            raise Refusal("FAILED_PRECONDITION", f"Update round {msg.round} sums ranks (Update.covers), but this "
                                                 f"run has no aggregators")
        if not msg.covers:
            raise Refusal("FAILED_PRECONDITION", f"Update round {msg.round} from rank {s.rank}: this run sums "
                                                 f"through aggregators (--aggregators {tree.F}); connect to one")
        ranks = [c[0] for c in msg.covers]
        for a, b in zip(ranks, ranks[1:]):
            if b <= a:
                raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: the sum covers rank {b} "
                                                  f"{'twice' if a == b else 'out of order'}")
        if ranks[0] != s.rank:
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: a sum over ranks {ranks[0]}.. must come on "
                                              f"the stream of its first rank, not rank {s.rank}'s")
        j = tree.block_of(ranks[0])
        block = tree.block(j)
        for r in ranks:
            if r not in block:
                raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: rank {r} is not in block {j} (ranks "
                                                  f"{block.start}..{block.stop - 1}) of rank {s.rank}'s sum")
            w = sessions.get(r)
            if w is None or w.peer != s.peer or w.state is not StreamState.RUNNING:
                raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: the sum from {s.peer} claims rank "
                                                  f"{r}, whose worker it does not relay")
            if r in self.updates or r in self.sizes:
                raise Refusal("FAILED_PRECONDITION", f"Update round {msg.round}: the sum covers rank {r}, which "
                                                     f"round {t} has summed already")
            if not self.sampled(r, t):
                raise Refusal("FAILED_PRECONDITION", f"Update round {msg.round}: the sum covers rank {r}, which "
                                                     f"round {t}'s sampled participation leaves out")
        if j in self.blocks:
            raise Refusal("FAILED_PRECONDITION", f"Update round {msg.round}: a second sum for block {j}")
        dense = any(r in self.g0_ranks for r in ranks) or (self.dense_rounds is not None and self.dense_rounds(t))
        per_rank = d if dense else self.max_entries
        if any(not 0 <= e <= min(per_rank, d) for _, e, _ in msg.covers):
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: a covered message of more than {per_rank} "
                                              f"entries")
        if msg.buffers is not None or msg.replace:
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: a sum carries no buffers or selector")
        vec = decode(msg.vector, f"Update round {msg.round}", max_nnz=min(d, per_rank * len(ranks)))
        summed = Message(vec)
        self.blocks[j] = (s.rank, ranks, summed)
        for r, e, is_dense in msg.covers:
            self.sizes[r] = (e, is_dense)
            self.updates[r] = (summed, nbytes if r == s.rank else 0)

    def _buffers(self, msg: UpdateIn, decode: Decode) -> SparseVector | None:
        """A model's change of buffers on an Update: of the model's size, finite; none where it has no buffers."""
        if msg.buffers is None:
            return None
        if not self.buffer_size:
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: buffers, but the run's model has none")
        b = decode(msg.buffers, f"Update round {msg.round} buffers", dim=self.buffer_size)
        if not np.all(np.isfinite(b.values)):
            raise Refusal("INVALID_ARGUMENT", f"Update round {msg.round}: non-finite buffers")
        return b

    def eval(self, s: WorkerStream, msg: pb.Eval, nbytes: int, t: int, decode: Decode) -> None:
        # Through aggregators a rank's Eval and its block's sum travel on different streams: either may come first.
        if (not self.is_eval_round(msg.round) or s.rank in self.evals
                or (self.tree is None and s.rank not in self.updates and self.sampled(s.rank, t))):
            raise Refusal("FAILED_PRECONDITION", f"unexpected Eval from rank {s.rank} for round {msg.round}")
        grad = None
        if msg.HasField("grad"):
            vec = decode(msg.grad, f"Eval round {msg.round}")
            if not vec.is_dense:
                raise Refusal("INVALID_ARGUMENT", f"Eval round {msg.round}: the gradient must be dense")
            grad = vec.values
        elif sends_eval_grad(self.rules.eval_grad, self.rules.tol, bool(msg.metrics)):
            # Only an objective with metrics of its own may leave it out, and not under --eval-grad or --tol.
            raise Refusal("INVALID_ARGUMENT", f"Eval round {msg.round}: the dense gradient is missing (it may be "
                                              f"left out only for an objective that reports metrics, without "
                                              f"--eval-grad or --tol)")
        dist = msg.distortion if msg.HasField("distortion") else None
        values = [msg.f, *msg.metrics.values()] + ([] if dist is None else [dist])
        if not all(math.isfinite(v) for v in values):
            raise Refusal("INVALID_ARGUMENT", f"Eval round {msg.round}: non-finite f, distortion or metric")
        self.evals[s.rank] = EvalInfo(grad, msg.f, dist, dict(msg.metrics) or None, nbytes)

    def forget(self, rank: int) -> None:
        """A lost worker's contribution to the open round goes too: a replacement recomputes it. (Not once an
        aggregator has summed it: the sum is the block's, and stays.)"""
        if rank in self.sizes:
            self.evals.pop(rank, None)
            return
        self.updates.pop(rank, None)
        self.evals.pop(rank, None)

    def may_move(self, t: int) -> bool:
        """Whether the Update just recorded may let round t close: every Update it asks for is in, or rounds may
        close without everyone (then the engine decides). Otherwise waking the engine would only find the round
        still open, once per message."""
        if self.rules.round_timeout is not None and self.rules.tolerates_missing:
            return True
        chosen = self.chosen(t)
        return len(self.updates) >= (self.rules.n if chosen is None else len(chosen))

    # -- when it closes --------------------------------------------------------------------------------------

    def complete(self, t: int) -> bool:
        return (all(r in self.updates for r in self.expected(t))
                and (not self.is_eval_round(t) or len(self.evals) == self.rules.n))

    def _evals_in(self, t: int) -> bool:
        """Every delivered Update of an evaluation round has its Eval too (a partial round logs no ‖∇f‖², but
        closing before a connected worker's Eval arrives would turn it into a late message)."""
        return not self.is_eval_round(t) or all(r in self.evals for r in self.updates)

    def may_close_partially(self, t: int, sessions: dict[int, WorkerStream]) -> tuple[bool, str | None]:
        """(whether the round may close without everyone, what to say in the status while it may not)."""
        rules = self.rules
        if not rules.tolerates_missing or rules.round_timeout is None:
            return False, None
        expected = self.expected(t)
        connected_missing = [r for r in expected if r not in self.updates and r in sessions
                             and sessions[r].state is StreamState.RUNNING]
        # No point waiting out the timeout for ranks with no worker at all: they cannot deliver.
        timed_out = time.monotonic() - self.started_at >= rules.round_timeout
        if not timed_out and connected_missing:
            return False, None
        least = min(rules.min_workers, len(expected))
        if len(self.updates) >= least and (timed_out or self._evals_in(t)):
            return True, None
        # Only --min-workers is worth a word; enough contributions with an Eval still on its way is a healthy round.
        if timed_out:
            return False, (f"round {t}: {len(self.updates)} of {len(expected)} contributions after the "
                           f"{rules.round_timeout:g} s timeout; waiting for at least {least} (--min-workers)")
        if len(self.updates) < least:
            return False, (f"round {t}: {len(self.updates)} of {len(expected)} contributions, the other ranks have "
                           f"no worker; waiting for at least {least} (--min-workers)")
        return False, None

    def wait_s(self) -> float | None:
        """How long the collection may sleep before it must look at the clock again (None: until woken)."""
        rules = self.rules
        if rules.round_timeout is None or not rules.tolerates_missing:
            return None
        left = rules.round_timeout - (time.monotonic() - self.started_at)
        # Past the deadline but below --min-workers: re-check as workers come back.
        return max(0.0, left) + 0.001 if left > 0 else 0.25

    def close(self, t: int, sessions: dict[int, WorkerStream]) -> ClosedRound:
        """Close round t with what came in; the next round starts empty."""
        n = self.rules.n
        messages: list[Message | None] = [self.updates[r][0] if r in self.updates else None for r in range(n)]
        sizes = carriers = None
        if self.tree is not None:
            d = next((m.vector.dim for m in messages if m is not None), 0)
            sums = [self.blocks[j][2] if j in self.blocks else None for j in range(self.tree.F)]
            messages = self.tree.tree_messages(sums, d) if d else messages
            sizes = [self.sizes[r] for r in range(n) if r in self.sizes]
            carriers = {c: ranks for c, ranks, _ in self.blocks.values()}
        missing = [r for r in range(n) if r not in self.updates]
        dropped = [r for r in self.expected(t) if r not in self.updates]
        evals = None
        if not dropped and self.is_eval_round(t) and len(self.evals) == n:
            evals = [self.evals[r] for r in range(n)]
        for r in range(n):
            if r in self.updates:
                self.last_in[r] = t
                self.g0_ranks.discard(r)  # the master now holds its g_i
                sessions[r].rounds_done += 1
                self.missed_streak[r] = 0
            else:
                self.missed_streak[r] = self.missed_streak.get(r, 0) + 1
        if dropped:
            self.missing_in[t] = dropped
        up_bytes = [nb for _, nb in self.updates.values()]
        if self.tree is not None:  # one message a block
            up_bytes = [self.updates[c][1] for c in carriers or {}]
        closed = ClosedRound(messages, missing, dropped, up_bytes, evals, sum(e.nbytes for e in self.evals.values()),
                             sizes, carriers)
        self.updates.clear()
        self.evals.clear()
        self.blocks.clear()
        self.sizes.clear()
        return closed

    def staleness(self) -> tuple[str, int] | None:
        """(what to say about ranks left out of recent rounds, the longest streak), or None when none is."""
        stale = {r: k for r, k in self.missed_streak.items() if k > 0}
        if not stale:
            return None
        worst = ", ".join(f"rank {r} ({k} rounds)" for r, k in sorted(stale.items()))
        return (f"left out of recent rounds: {worst}. A rank that does not come back keeps a stale g_i in the "
                f"mean, and the run then converges to a point that is not stationary for f"), max(stale.values())

    def stale_ranks(self) -> dict[str, int]:
        return {str(r): k for r, k in sorted(self.missed_streak.items()) if k > 0}
