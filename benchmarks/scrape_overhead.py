"""What watching a run costs it: rounds/s of one ``ef21 run`` while nobody watches, while a Prometheus-style
scraper polls /metrics every 100 ms, and while a dashboard-style poller asks for /status and the new history
every 100 ms (ten times what the page does).

The modes take turns in windows of one run (off, metrics, off, dashboard, …) so that the shared machine's drift
falls on all of them alike; a window's rate is the rounds /status reports at its two ends (one request each, in
every mode). Before that, the master's own work is timed in-process: per round (history, histograms) and per
request, since each reply is built on the event loop that runs the rounds.

    python benchmarks/scrape_overhead.py [--smoke] [--json out.json] [--windows 40] [--window-s 1.0]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, print_table, write_json  # noqa: E402

MODES = {"off": (), "metrics": ("metrics",), "dashboard": ("status", "history")}
PERIOD_S = 0.1


def poll(base: str, paths: tuple[str, ...], stop: threading.Event, times: list[float]) -> None:
    """Polls like a scraper (/metrics) or like the page (/status, then the history after the last round it has)."""
    since = -1
    while not stop.is_set():
        t0 = time.perf_counter()
        for p in paths:
            try:
                with urllib.request.urlopen(base + (f"history?since={since}" if p == "history" else p),
                                            timeout=5) as r:
                    body = r.read()
                if p == "history":
                    points = json.loads(body)["points"]
                    since = points[-1][0] if points else since
            except OSError:
                pass  # the run ended between two polls
        times.append(time.perf_counter() - t0)
        stop.wait(max(0.0, PERIOD_S - (time.perf_counter() - t0)))


async def costs(rounds: int, workers: int) -> list[list]:
    """The master's own work, timed in-process after a real run: per round (history + histograms) and per
    request (each reply is built on the event loop, so this is how long a request holds a round up)."""
    from common import best_time

    from ef21.engine.config import RunConfig
    from ef21_server.coordinator import MasterOptions
    from ef21_server.history import MAX_POINTS_PER_REPLY, History
    from ef21_server.master import ListenOptions, Master
    from ef21_server.metrics import RoundObserver, render

    master = Master(MasterOptions(RunConfig(workers=workers, k=2, stepsize_mult=64, rounds=rounds)),
                    ListenOptions(port=0, status_port=0))
    await master.start()
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-m", "ef21_worker", "--master", master.address,
                                                  stdin=subprocess.DEVNULL) for _ in range(workers)]
    await master.wait()
    for p in procs:
        await p.wait()
    rec, last = master.coord.latest, master.coord.latest.round

    h, o = History(), RoundObserver(workers)
    recs = iter([dataclasses.replace(rec, round=i) for i in range(12_000)])

    def one_round() -> None:
        r = next(recs)
        h.add(r)
        o.observe(r)

    per_round = best_time(one_round, 2000)
    out = [["per round: history + histograms", per_round * 1e6],
           ["GET /metrics (render)", best_time(lambda: render(master.registry), 200) * 1e6],
           ["GET /status (document + JSON)", best_time(lambda: json.dumps(master.status()), 200) * 1e6],
           ["GET /history, the page's poll (1 s of rounds)", best_time(
               lambda: master.history.to_json(last - 300), 200) * 1e6],
           [f"GET /history, first load ({min(len(master.history), MAX_POINTS_PER_REPLY)} points, one slice)",
            best_time(lambda: master.history.to_json(-1), 50) * 1e6]]
    await master.shutdown()
    return out


def status_round(base: str) -> int:
    with urllib.request.urlopen(base + "status", timeout=5) as r:
        return json.loads(r.read())["round"]


def windows(n_windows: int, window_s: float, workers: int) -> list[dict]:
    order = ["off", "metrics", "off", "dashboard"]
    proc = subprocess.Popen([sys.executable, "-m", "ef21", "run", "--workers", str(workers), "--k", "2",
                             "--stepsize-mult", "64", "--rounds", "100000000", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    try:
        base = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"dashboard (http://\S+/);", line)
            if m:
                base = m.group(1)
                break
        assert base is not None, "ef21 run printed no dashboard URL"
        while status_round(base) < 50:  # past start-up
            time.sleep(0.1)
        for i in range(n_windows):
            mode = order[i % len(order)]
            stop, times = threading.Event(), []
            r0, t0 = status_round(base), time.perf_counter()
            thread = threading.Thread(target=poll, args=(base, MODES[mode], stop, times))
            if MODES[mode]:
                thread.start()
            time.sleep(window_s)
            stop.set()
            if MODES[mode]:
                thread.join()
            r1, t1 = status_round(base), time.perf_counter()
            out.append({"mode": mode, "rounds_per_s": (r1 - r0) / (t1 - t0), "polls": len(times),
                        "poll_ms": [1e3 * t for t in times]})
            print(f"  window {i + 1}/{n_windows} {mode}: {out[-1]['rounds_per_s']:.1f} rounds/s", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    return out


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    n_windows, window_s = (8, 0.5) if args.smoke else (args.windows, args.window_s)
    cost_rounds = 300 if args.smoke else 3000
    cost_rows = asyncio.run(costs(cost_rounds, args.workers))
    print(f"\nthe master's work for watching (after {cost_rounds} rounds; µs, best of 5)")
    print_table(["what", "µs"], cost_rows)
    runs = windows(n_windows, window_s, args.workers)
    base = statistics.median(r["rounds_per_s"] for r in runs if r["mode"] == "off")
    rows, results = [], []
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        rate = statistics.median(r["rounds_per_s"] for r in mine)
        polls = [t for r in mine for t in r["poll_ms"]]
        rows.append([mode, ", ".join(MODES[mode]) or "-", len(mine), rate, rate / base, len(polls),
                     statistics.median(polls) if polls else "-", max(polls) if polls else "-"])
        results.append({"mode": mode, "paths": list(MODES[mode]), "windows": len(mine),
                        "rounds_per_s_median": rate, "vs_off": rate / base,
                        "rounds_per_s": [r["rounds_per_s"] for r in mine]})
    print(f"\nef21 run, mushrooms, n = {args.workers}, Top-2; {window_s:g} s windows taking turns; polling every "
          f"{PERIOD_S * 1e3:.0f} ms; median over each mode's windows")
    print_table(["mode", "polled", "windows", "rounds/s", "vs off", "polls", "poll ms (median)", "poll ms (max)"],
                rows)
    write_json(args.json, "scrape_overhead", results, workers=args.workers, period_s=PERIOD_S, window_s=window_s,
               costs_us={what: us for what, us in cost_rows})


if __name__ == "__main__":
    main()
