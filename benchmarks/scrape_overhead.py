"""What watching a run costs it: rounds/s of ``ef21 run`` with nobody watching, with a Prometheus-style scraper
polling /metrics every 100 ms, and with a dashboard-style poller (/status and /history every 100 ms, ten times
what the page does).

Runs alternate between the modes (off, metrics, dashboard, off, …) so that the shared machine's drift falls on
all of them alike; rounds/s is read off each run's own log (rounds after the first / time between them), so
start-up is not counted. The scraper also reports its scrape times.

    python benchmarks/scrape_overhead.py [--smoke] [--json out.json] [--rounds 3000] [--repeat 3]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import tempfile
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

    from ef21.config import RunConfig
    from ef21_server.coordinator import MasterOptions
    from ef21_server.master import ListenOptions, Master
    from ef21_server.history import History
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
           ["GET /status (document + JSON)", best_time(lambda: json.dumps(master.coord.status()), 200) * 1e6],
           ["GET /history, the page's poll (1 s of rounds)", best_time(
               lambda: master.history.to_json(last - 300), 200) * 1e6],
           [f"GET /history, first load ({min(len(master.history), 1024)} points)",
            best_time(lambda: master.history.to_json(-1), 50) * 1e6]]
    await master.shutdown()
    return out


def one_run(mode: str, rounds: int, workers: int, folder: Path) -> dict:
    log = folder / f"{mode}-{time.monotonic_ns()}.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ef21.cli", "run", "--workers", str(workers), "--k", "2",
                             "--stepsize-mult", "64", "--rounds", str(rounds), "-q", "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, times = threading.Event(), []
    thread = None
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"dashboard (http://\S+/);", line)
        if m:
            if MODES[mode]:
                thread = threading.Thread(target=poll, args=(m.group(1), MODES[mode], stop, times))
                thread.start()
            break
    out, err = proc.communicate(timeout=600)
    stop.set()
    if thread is not None:
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"ef21 run failed: {err}")
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    rate = (recs[-1]["round"] - recs[1]["round"]) / (recs[-1]["elapsed_s"] - recs[1]["elapsed_s"])
    return {"mode": mode, "rounds_per_s": rate, "scrapes": len(times),
            "scrape_ms_median": 1e3 * statistics.median(times) if times else None,
            "scrape_ms_max": 1e3 * max(times) if times else None}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rounds, repeat = (200, 1) if args.smoke else (args.rounds, args.repeat)
    cost_rows = asyncio.run(costs(rounds, args.workers))
    print(f"\nthe master's work for watching ({rounds} rounds done; µs, best of 5)")
    print_table(["what", "µs"], cost_rows)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for mode in MODES:
                r = one_run(mode, rounds, args.workers, Path(tmp))
                print(f"  [{i + 1}/{repeat}] {mode}: {r['rounds_per_s']:.1f} rounds/s", flush=True)
                runs.append(r)
    base = statistics.median(r["rounds_per_s"] for r in runs if r["mode"] == "off")
    rows, results = [], []
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        rate = statistics.median(r["rounds_per_s"] for r in mine)
        med = [r["scrape_ms_median"] for r in mine if r["scrape_ms_median"] is not None]
        worst = [r["scrape_ms_max"] for r in mine if r["scrape_ms_max"] is not None]
        rows.append([mode, ", ".join(MODES[mode]) or "-", rate, rate / base, sum(r["scrapes"] for r in mine),
                     statistics.median(med) if med else "-", max(worst) if worst else "-"])
        results.append({"mode": mode, "paths": list(MODES[mode]), "rounds_per_s_median": rate,
                        "vs_off": rate / base, "runs": mine})
    print(f"\nef21 run, mushrooms, n = {args.workers}, Top-2, {rounds} rounds; polling every {PERIOD_S * 1e3:.0f} ms "
          f"(median of {repeat} runs each)")
    print_table(["mode", "polled", "rounds/s", "vs off", "polls", "poll ms (median)", "poll ms (max)"], rows)
    write_json(args.json, "scrape_overhead", results, rounds=rounds, workers=args.workers, period_s=PERIOD_S,
               costs_us={what: us for what, us in cost_rows})


if __name__ == "__main__":
    main()
