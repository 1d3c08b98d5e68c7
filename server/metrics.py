"""``GET /metrics``: the master's state in the Prometheus text format, read at scrape time.

Nearly everything is read from the coordinator when Prometheus asks (a custom collector), so a round does no
work for metrics. The two distributions the coordinator does not keep (round durations, uplink entries per
message) are filled from the round's record after its downlink has gone out (``RoundObserver.observe``, called
from the master's ``on_round``): a couple of additions per round, off the critical path.

Each master has its own registry (no global default registry): tests and benchmarks run several masters in one
process.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ef21.engine.accounting import PAPER_BITS_PER_VALUE
from ef21.engine.records import RoundRecord

from .streams import StreamState

if TYPE_CHECKING:
    from .coordinator import Coordinator

# The classic text format: every Prometheus 2.x (Debian's included) reads it, and our names need nothing newer.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKER_STATES = tuple(str(s) for s in StreamState)
RUN_STATES = ("waiting", "running", "done", "failed", "stopped")
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                      60.0)
ENTRY_BUCKETS = tuple(float(4**i) for i in range(13))  # 1 … 16.7M entries: Top-1 to dense d = 10^7


class Buckets:
    """A histogram's counts, kept the way Prometheus wants them read (cumulative, with a sum)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts):
            total += c
            cumulative.append((floatToGoString(bound), total))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


class RoundObserver:
    """What a round's record adds to the distributions; fed once per logged round."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.durations = Buckets(DURATION_BUCKETS_S)
        self.entries = Buckets(ENTRY_BUCKETS)
        self._prev: RoundRecord | None = None

    def observe(self, rec: RoundRecord) -> None:
        prev = self._prev
        # elapsed_s is taken when each round closes, so consecutive differences are the rounds' durations and
        # their sum is the latest elapsed_s.
        self.durations.observe(max(rec.elapsed_s - (0.0 if prev is None else prev.elapsed_s), 0.0))
        if prev is not None and prev.round == rec.round - 1:
            # Round 0's dense initial message is outside the paper's bit count, so it is outside this too.
            sent = self.n - len(rec.missing or ())
            entries = (rec.bits_per_worker - prev.bits_per_worker) * self.n / PAPER_BITS_PER_VALUE
            if sent > 0:
                self.entries.observe(entries / sent, sent)  # every compressor sends equally many entries a worker
        self._prev = rec


class MasterCollector(Collector):
    def __init__(self, coord: Coordinator, observer: RoundObserver) -> None:
        self.coord = coord
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        c = self.coord
        cfg, rec = c.cfg, c.latest
        yield InfoMetricFamily("ef21_run", "The run this master serves.", value={
            "run_id": c.run_id, "method": cfg.method, "compressor": cfg.compressor, "k": str(cfg.k),
            "problem": cfg.problem, "data": str(cfg.data)})
        state = GaugeMetricFamily("ef21_run_state", "1 for the run's current state.", labels=["state"])
        for s in RUN_STATES:
            state.add_metric([s], 1.0 if c.state == s else 0.0)
        yield state
        yield GaugeMetricFamily("ef21_round", "The round in progress (t of x^t).", value=c.round)
        yield GaugeMetricFamily("ef21_rounds_planned", "Rounds the run stops after (--rounds).", value=cfg.rounds)
        yield CounterMetricFamily("ef21_rounds_completed", "Rounds closed since the run started (or resumed "
                                  "from its checkpoint's round).", value=c.rounds_completed)
        yield self.observer.durations.family(
            "ef21_round_duration_seconds", "Time from one round's close to the next one's (this master's life).")
        workers = GaugeMetricFamily("ef21_workers", "Worker streams by state (each rank's latest stream, and the "
                                    "streams not yet joined).", labels=["state"])
        streams = [*c.sessions.values(), *(w for w in c.members.live if w.rank is None)]
        for s in WORKER_STATES:
            workers.add_metric([s], sum(1 for w in streams if str(w.state) == s))
        yield workers
        yield GaugeMetricFamily("ef21_workers_expected", "Workers the run needs (n).", value=c.n)
        wire = CounterMetricFamily("ef21_wire_bytes", "Bytes of round messages (Update up, RoundResult down) as "
                                   "serialized plus gRPC's 5-byte frame prefix, all workers, up to the latest "
                                   "closed round.", labels=["direction"])
        wire.add_metric(["up"], _or0(None if rec is None else rec.wire_bytes_up))
        wire.add_metric(["down"], _or0(None if rec is None else rec.wire_bytes_down))
        yield wire
        yield CounterMetricFamily("ef21_eval_bytes", "Bytes of the dense exact-gradient evaluations (--eval-every), "
                                  "not part of the compressed traffic.", value=_or0(None if rec is None
                                                                                   else rec.eval_bytes))
        yield CounterMetricFamily("ef21_paper_bytes_per_worker", "The paper's communication count in bytes "
                                  "(its bits / 8): 4 bytes per sent value, no indices, round 0 excluded, mean over "
                                  "workers.", value=0.0 if rec is None else rec.bits_per_worker / 8)
        yield self.observer.entries.family(
            "ef21_uplink_entries_per_message", "Sparse entries in each worker's Update (round 0 excluded).")
        yield CounterMetricFamily("ef21_late_messages", "Messages that arrived after their round closed without "
                                  "them (--round-timeout).", value=c.late_messages)
        refused = CounterMetricFamily("ef21_refused_messages", "Worker streams ended by a refusal, by gRPC status "
                                      "code.", labels=["code"])
        for code, count in sorted(c.refused.items()):
            refused.add_metric([code], count)
        yield refused
        lat = {} if rec is None else {"f": rec.f, "G": rec.G}
        for name, value, doc in (
            ("ef21_objective", lat.get("f"), "f(x^t) of the latest round in which every worker reported."),
            ("ef21_grad_norm_squared", c.last_grad_norm_sq, "‖∇f(x^t)‖² of the latest evaluated round."),
            ("ef21_estimator_error", lat.get("G"), "G^t = (1/n) Σ ‖g_i^t − ∇f_i(x^t)‖², latest round."),
            ("ef21_aggregate_norm_squared", c.g_norm, "‖g^t‖² of the master's aggregate."),
            ("ef21_stepsize", None if c.constants is None else c.constants.gamma, "The stepsize γ."),
        ):
            if value is not None:  # unknown (no round yet, or a round that left workers out): no sample
                yield GaugeMetricFamily(name, doc, value=value)
        behind = GaugeMetricFamily("ef21_rank_rounds_behind", "Consecutive rounds each rank has been left out of "
                                   "(0: it took part in the latest round).", labels=["rank"])
        for r in range(c.n):
            behind.add_metric([str(r)], c.missed_streak.get(r, 0))
        yield behind


def _or0(v: float | None) -> float:
    return 0.0 if v is None else float(v)


def make_registry(coord: Coordinator, observer: RoundObserver) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(coord, observer))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
