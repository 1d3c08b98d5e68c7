"""How fast each side of a gRPC stream notices that the other is gone, and which keepalive settings keep a slow but
healthy link alive: the measurements behind the keepalive settings of the master (server/grpc_server.py) and the
worker (worker/channel.py).

A server and a client process, each in a network namespace of its own (tests/netns.py), hold one bidirectional
stream open with the given keepalive settings on both sides (ping every K seconds, give up after T seconds
without the ack; TCP_USER_TIMEOUT is T too, as gRPC sets it). Three cases, each run for every candidate (K, T):

- black hole: after 2 s every packet between them is dropped (iptables DROP, no RST, no ICMP); the time each
  side's stream fails is its detection time (a client that reconnects then finds the path still closed);
- busy slow link: 1 Mbit/s (tc tbf) while the server sends one 4 MB message (about 34 s on the link): the
  stream must survive the transfer, pings and all;
- lossy latency: 3 % loss both ways with a relay adding 30-50 ms to every chunk upstream, small messages every
  50 ms for 60 s: the stream must survive;
- busy client: the client's only thread computes in pure Python for 12 s (the GIL held, its event loop
  blocked), as a worker with a slow objective does: the stream must survive (gRPC answers pings off the GIL).

The black holes run first, all candidates side by side, then the two others (a busy machine delays the processes,
not the kernel's timers, so the cases of one batch do not disturb each other's outcome much).

    sudo python benchmarks/liveness.py                    # the table and, with --json, the summary
    sudo python benchmarks/liveness.py --smoke            # one candidate, the black hole only (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

PY = sys.executable
PORT = 50077
CANDIDATES = [(1.0, 2.0), (2.0, 2.0), (2.0, 4.0), (5.0, 5.0), (10.0, 10.0), (20.0, 10.0)]
"""(K, T) in seconds; (20, 10) is what the workers used before these measurements (the master: 30, 10)."""
LOSSY_S = 60.0
BLOCK_S = 12.0


def options(k: float, t: float, server: bool) -> list[tuple[str, int]]:
    opts = [("grpc.keepalive_time_ms", int(k * 1000)), ("grpc.keepalive_timeout_ms", int(t * 1000)),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    if server:
        opts += [("grpc.http2.min_ping_interval_without_data_ms", int(k * 1000 / 2)),
                 ("grpc.http2.max_ping_strikes", 0)]
    return opts


# -- the two processes ----------------------------------------------------------------------------------------


async def _server(k: float, t: float, big: int) -> None:
    import grpc

    async def stream(requests, context):  # type: ignore[no-untyped-def]
        print("open", flush=True)

        async def read() -> None:
            async for _ in requests:
                pass
        reader = asyncio.create_task(read())
        try:
            if big:
                await context.write(b"\0" * big)
                print(f"sent {time.time():.3f}", flush=True)
            await reader
            print(f"ended {time.time():.3f} client closed", flush=True)
        except BaseException as exc:
            print(f"ended {time.time():.3f} {type(exc).__name__}", flush=True)
            raise
        finally:
            if not reader.done():
                reader.cancel()
            print(f"ended {time.time():.3f} done {context.done() if hasattr(context, 'done') else ''}", flush=True)

    server = grpc.aio.server(options=options(k, t, True))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Live", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})])
    server.add_insecure_port(f"0.0.0.0:{PORT}")
    await server.start()
    print("listening", flush=True)
    await server.wait_for_termination()


async def _client(target: str, k: float, t: float, every: float, block: float) -> None:
    import grpc

    async with grpc.aio.insecure_channel(target, options=options(k, t, False)) as ch:
        call = ch.stream_stream("/bench.Live/Stream")()
        if block:
            await call.write(b"x")
            await asyncio.sleep(0.5)
            spin, end = 0, time.time() + block
            while time.time() < end:  # pure Python: the GIL held, the loop blocked
                spin += 1
            await call.write(b"y")
            await asyncio.sleep(1.0)
            print(f"{'alive' if not call.done() else 'ended'} {time.time():.3f}", flush=True)
            return

        async def send() -> None:
            while every > 0:
                await call.write(b"x" * 64)
                await asyncio.sleep(every)

        sender = asyncio.create_task(send())
        try:
            while True:
                got = await call.read()
                if got is grpc.aio.EOF:
                    print(f"ended {time.time():.3f} EOF", flush=True)
                    return
                print(f"received {time.time():.3f} {len(got)}", flush=True)
        except grpc.aio.AioRpcError as exc:
            print(f"ended {time.time():.3f} {exc.code().name} {exc.details()}", flush=True)
        finally:
            sender.cancel()


# -- the cases ---------------------------------------------------------------------------------------------------


def _ended(lines: list[str]) -> float | None:
    return next((float(x.split()[1]) for x in lines if x.startswith("ended")), None)


def case(kind: str, k: float, t: float) -> dict:
    """One case for one candidate, in a network of its own."""
    import subprocess

    from tests.netns import Network

    me = str(Path(__file__).resolve())
    with Network(["s", "c"], label="live") as net:
        big = 4 << 20 if kind == "busy" else 0
        srv = net.popen("s", [PY, me, "_server", str(k), str(t), str(big)], stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        target = f"{net.addr('s')}:{PORT}"
        relay = None
        if kind == "busy":
            net.rate("c", "1mbit")
        if kind == "lossy":
            net.loss("c", "s", 0.03)
            net.loss("s", "c", 0.03)
            relay = net.relay("c", PORT + 1, target, delay_ms=(30.0, 50.0))
            target = f"127.0.0.1:{PORT + 1}"
        every = 0.05 if kind == "lossy" else 0.0
        block = BLOCK_S if kind == "gil" else 0.0
        cli = net.popen("c", [PY, me, "_client", target, str(k), str(t), str(every), str(block)],
                        stdout=subprocess.PIPE, text=True)
        # The clock starts once the stream is open (the processes start slowly on a busy machine).
        assert srv.stdout.readline().strip() == "open"
        start = time.time()
        out: dict = {"case": kind, "K_s": k, "T_s": t}
        try:
            if kind == "hole":
                time.sleep(2.0)
                fault = time.time()
                net.blackhole("c")
                limit = 2 * (k + t) + 10
                for p in (cli, srv):
                    try:
                        p.wait(timeout=max(0.1, fault + limit - time.time()))
                    except subprocess.TimeoutExpired:
                        pass
                srv.kill()
                cli.kill()
                s_lines, c_lines = srv.stdout.read().splitlines(), cli.stdout.read().splitlines()  # type: ignore
                s_end, c_end = _ended(s_lines), _ended(c_lines)
                out.update(server_detects_s=None if s_end is None else round(s_end - fault, 2),
                           client_detects_s=None if c_end is None else round(c_end - fault, 2))
            elif kind == "gil":
                cli.wait(timeout=BLOCK_S + 30)
                out.update(survived=cli.stdout.read().startswith("alive"))  # type: ignore[union-attr]
            else:
                duration = 45.0 if kind == "busy" else LOSSY_S
                time.sleep(duration)
                srv.kill()
                cli.kill()
                s_lines, c_lines = srv.stdout.read().splitlines(), cli.stdout.read().splitlines()  # type: ignore
                c_end = _ended(c_lines)
                # Killing the server at the end ends the client's stream too: only an earlier end is a drop.
                dropped = c_end is not None and c_end < start + duration - 0.5
                got = [float(x.split()[1]) for x in c_lines if x.startswith("received")]
                out.update(survived=not dropped, transfer_s=round(got[0] - start, 1) if got and big else None)
        finally:
            for p in (srv, cli, relay):
                if p is not None and p.poll() is None:
                    p.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args, rest = ap.parse_known_args()
    if rest and rest[0] == "_server":
        asyncio.run(_server(float(rest[1]), float(rest[2]), int(rest[3])))
        return
    if rest and rest[0] == "_client":
        asyncio.run(_client(rest[1], float(rest[2]), float(rest[3]), float(rest[4]), float(rest[5])))
        return
    from tests.netns import unavailable

    reason = unavailable()
    if reason:
        print(f"liveness: skipped ({reason})")
        return
    cands = [(1.0, 2.0)] if args.smoke else CANDIDATES
    kinds = ["hole"] if args.smoke else ["hole", "busy", "lossy", "gil"]
    results: list[dict] = []
    for batch in (["hole"], ["busy", "lossy", "gil"]):
        jobs = [(kind, k, t) for k, t in cands for kind in kinds if kind in batch]
        if jobs:
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                results += list(pool.map(lambda j: case(*j), jobs))
    rows = []
    for k, t in cands:
        by = {r["case"]: r for r in results if (r["K_s"], r["T_s"]) == (k, t)}
        hole, busy, lossy, gil = (by.get(c, {}) for c in ("hole", "busy", "lossy", "gil"))
        rows.append([k, t, hole.get("server_detects_s"), hole.get("client_detects_s"),
                     busy.get("survived", "-"), busy.get("transfer_s", "-"), lossy.get("survived", "-"),
                     gil.get("survived", "-")])
    print("\nKeepalive: ping every K s, drop after T s without its ack (both sides)")
    print_table(["K s", "T s", "server detects s", "client detects s", "1 Mbit/s, 4 MB: survives",
                 "transfer s", "3 % loss, 30-50 ms: survives", "busy client 12 s: survives"], rows)
    write_json(args.json, "liveness", results)


if __name__ == "__main__":
    main()
