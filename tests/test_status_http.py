"""The status port beside a live run: the dashboard's files and curves, the token, and clients that are slow or
never read, which must not slow the rounds down."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

from ef21.engine.config import RunConfig
from ef21.engine.records import RoundRecord
from ef21_server.coordinator import MasterOptions
from ef21_server.history import History
from ef21_server.master import ListenOptions, Master
from ef21_server.security import ServerSecurity
from ef21_server.status_http import MAX_CONNECTIONS, READ_TIMEOUT_S

from .helpers import eventually, finish, http_get, running_master, spawn_worker

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "server" / "static" / "vendor"


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def record(t: int, f: float = 1.0) -> RoundRecord:
    return RoundRecord(round=t, f=f, grad_norm_sq=1.0 / (t + 1), G=0.5, bits_per_worker=64.0 * t,
                       payload_bits_per_worker=0.0, elapsed_s=0.01 * t, g_norm_sq=None, wire_bytes_up=10 * t,
                       wire_bytes_down=12 * t)


def test_vendored_chart_library_matches_its_pins():
    lock = json.loads((VENDOR / "uplot.lock.json").read_text())
    assert lock["package"] == "uplot" and lock["license"] == "MIT" and lock["integrity"].startswith("sha512-")
    files = {p.name for p in VENDOR.iterdir() if p.name != "uplot.lock.json"}
    assert files == set(lock["sha256"]) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE-uPlot"}
    for name, digest in lock["sha256"].items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, f"{name} differs from its pin"
    assert "MIT License" in (VENDOR / "LICENSE-uPlot").read_text()


def test_history_keeps_every_round_up_to_its_cap_then_thins_evenly():
    h = History(cap=64)
    for t in range(40):
        h.add(record(t))
    assert [p[0] for p in h.since(-1)["points"]] == list(range(40))
    for t in range(40, 10_000):
        h.add(record(t))
    doc = h.since(-1, limit=10_000)
    rounds = [p[0] for p in doc["points"]]
    assert len(h) < 64 and doc["stride"] == 256 and rounds[-1] == 9999  # the newest round is always there
    assert rounds[:-1] == list(range(0, 10_000, 256))  # evenly spaced over the whole run
    # Slices: at most `limit` points, and `more` until the client has caught up.
    first = h.since(-1, limit=10)
    assert len(first["points"]) == 10 and first["more"]
    rest = h.since(first["points"][-1][0], limit=10_000)
    assert [p[0] for p in first["points"] + rest["points"]] == rounds and not rest["more"]
    assert h.since(9999)["points"] == []
    # Non-finite figures go out as null: JSON has no NaN.
    h.add(record(10_000, f=float("nan")))
    assert json.loads(h.to_json(9999))["points"][0][3] is None


def test_history_after_a_resume_replaces_the_repeated_rounds():
    h = History(cap=100)
    for t in list(range(10)) + list(range(5, 8)):
        h.add(record(t, f=float(t >= 5 and len(h) >= 10)))
    assert [p[0] for p in h.since(-1)["points"]] == [0, 1, 2, 3, 4, 5, 6, 7]


async def test_dashboard_files_history_and_the_status_token():
    cfg = RunConfig(workers=2, k=2, stepsize_mult=64, rounds=50)
    sec = ServerSecurity(token="tok", status_token=True)
    master = Master(MasterOptions(cfg), ListenOptions(port=0, status_port=0, drain_s=1.0), security=sec)
    await master.start()
    try:
        procs = [await spawn_worker(master.address, "--token", "tok") for _ in range(2)]
        await asyncio.wait_for(master.wait(), 60)
        await finish(procs)
        base = master.status_url.rstrip("/")
        # The page and its files need no token (no run data in them); every data path does.
        code, headers, page = await asyncio.to_thread(get, base + "/")
        assert code == 200 and headers["Content-Type"].startswith("text/html") and b"uPlot.iife.min.js" in page
        assert "default-src 'self'" in headers["Content-Security-Policy"]  # nothing from anywhere else
        for path in ("/static/dashboard.js", "/static/vendor/uPlot.iife.min.js", "/static/vendor/uPlot.min.css"):
            code, _, body = await asyncio.to_thread(get, base + path)
            assert code == 200 and body
        assert (await asyncio.to_thread(get, base + "/static/vendor/uplot.lock.json"))[0] == 401  # not served
        for path in ("/status", "/history?since=-1", "/metrics"):
            code, headers, _ = await asyncio.to_thread(get, base + path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        # /healthz answers probes, which carry no token; it says only up or failed.
        code, _, body = await asyncio.to_thread(get, base + "/healthz")
        assert code == 200 and set(json.loads(body)) == {"ok", "state"}
        auth = {"Authorization": "Bearer tok"}
        code, _, body = await asyncio.to_thread(get, base + "/history?since=-1", auth)
        doc = json.loads(body)
        assert code == 200 and doc["columns"][0] == "round" and not doc["more"]
        rounds = [p[0] for p in doc["points"]]
        assert rounds == list(range(master.coord.latest.round + 1))  # every round of a short run
        last = dict(zip(doc["columns"], doc["points"][-1]))
        lat = master.status()["latest"]
        assert (last["f"], last["grad_norm_sq"], last["bits_per_worker"]) == (lat["f"], lat["grad_norm_sq"],
                                                                              lat["bits_per_worker"])
        code, _, body = await asyncio.to_thread(get, base + f"/history?since={rounds[-2]}", auth)
        assert [p[0] for p in json.loads(body)["points"]] == [rounds[-1]]
        assert (await asyncio.to_thread(get, base + "/history?since=x", auth))[0] == 400
    finally:
        await master.shutdown()


def slow_clients(host: str, port: int, stop: threading.Event, report: dict) -> None:
    """Clients that misbehave towards the status port: they ask for the largest replies and never read them,
    send their request one byte at a time, or connect and say nothing, many more than the server serves."""
    socks: list[socket.socket] = []

    def connect(rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect((host, port))
        socks.append(s)
        return s

    try:
        for _ in range(8):  # never read: the server's send buffer fills, its drain times out
            connect(rcvbuf=4096).sendall(b"GET /history?since=-1 HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(8):
            connect(rcvbuf=4096).sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        trickle = [connect() for _ in range(8)]
        idle = [connect() for _ in range(MAX_CONNECTIONS)]  # past the cap: refused at once
        request = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
        i = 0
        while not stop.is_set():
            for s in trickle:
                try:
                    s.send(request[i % len(request):i % len(request) + 1])
                except OSError:
                    pass
            i += 1
            time.sleep(0.2)
        refused = 0
        for s in idle:
            s.settimeout(0.1)
            try:
                refused += s.recv(64).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
        report["refused"] = refused
        # The server gave up on every slow client by now: their connections are closed (EOF or reset).
        closed = 0
        for s in socks[:24]:
            s.settimeout(0.5)
            try:
                while s.recv(65536):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
            except OSError:
                pass
        report["closed"] = closed
    finally:
        for s in socks:
            s.close()


async def test_slow_and_silent_clients_never_slow_the_rounds():
    cfg = RunConfig(workers=2, k=2, stepsize_mult=64, rounds=1_000_000)
    async with running_master(MasterOptions(cfg)) as master:
        procs = [await spawn_worker(master.address) for _ in range(2)]
        try:
            await eventually(lambda: master.coord.round >= 50, what="rounds")
            # A history long enough that /history replies are full slices (larger than the clients' buffers).
            await eventually(lambda: len(master.history) >= 600, what="history")

            async def rate(seconds: float) -> tuple[float, float]:
                """Rounds per second over a window, and the longest time one round took in it."""
                r0, t0 = master.coord.round, time.monotonic()
                await asyncio.sleep(seconds)
                recent = master.history.since(r0, limit=100_000)["points"]
                gaps = [b[1] - a[1] for a, b in zip(recent, recent[1:])]
                return (master.coord.round - r0) / (time.monotonic() - t0), max(gaps)

            base, _ = await rate(2.0)
            stop, report = threading.Event(), {}
            thread = threading.Thread(target=slow_clients, args=("127.0.0.1", master.http.port, stop, report))
            thread.start()
            try:
                loaded, worst = await rate(READ_TIMEOUT_S + 2.0)  # past the read timeout: every give-up happened
            finally:
                stop.set()
                await asyncio.to_thread(thread.join, 30)
            # Waiting on any one of these clients would stop the rounds for READ_TIMEOUT_S (5 s).
            assert worst < READ_TIMEOUT_S / 2, worst
            # Somewhat lower is the clients' own share of a small machine (and of whatever else runs beside the
            # suite); a master that served them on its loop would stall rounds, which ``worst`` catches.
            assert loaded > 0.25 * base, (loaded, base)
            print(f"rounds/s {base:.0f} before, {loaded:.0f} with the slow clients; longest round {worst:.3f} s")
            assert report["refused"] >= 8  # connections over the cap: a 503 at once, nothing held for them
            assert report["closed"] == 24
            code, doc = await asyncio.to_thread(http_get, f"http://127.0.0.1:{master.http.port}/status")
            assert code == 200 and doc["state"] == "running"  # and it still serves everyone else
        finally:
            await master.shutdown()
            await finish(procs, timeout=30)
