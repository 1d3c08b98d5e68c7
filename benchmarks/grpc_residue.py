"""What a bare grpc.aio server keeps per connection after each client has sent it one large message: the obstacle
to issue 24's set-up memory target (docs/benchmarks/capacity.md, "Set-up memory").

The master's RSS after a logistic set-up grows by about 1.1 MB a worker beyond the quadratic case's, although
Python holds 3 MiB (tracemalloc) and the master keeps only the sum and two d×d Grams. This script takes ef21 out:
a server whose one handler reads a stream's messages and drops them, and a client process with C connections that
each send M bytes (a d = 10³ Gram: 8 MB) on one stream, two connections at a time as the master asks for Grams,
in messages of S bytes, then stay connected. The server's RSS after all C have sent, less its RSS before, over C,
is what gRPC's core (and the allocator under it) keeps per connection for having carried that message.

    python benchmarks/grpc_residue.py --connections 256 --json benchmarks/results/grpc_residue.json
    python benchmarks/grpc_residue.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, load_average, print_table, status_kib, write_json  # noqa: E402

METHOD = "/residue.Sink/Send"
LIMIT = 64 * 1024 * 1024


def _rss_kib() -> int:
    kib = status_kib(os.getpid(), "VmRSS")
    if kib is None:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return kib


async def serve(port_file: Path, connections: int, total: int) -> None:
    """The sink: reads each stream to ``total`` bytes, answers once, keeps the stream open; prints its RSS."""
    done = asyncio.Event()
    finished = 0

    async def send(_requests, context: grpc.aio.ServicerContext) -> None:
        nonlocal finished
        got = 0
        while got < total:
            raw = await context.read()
            if raw is grpc.aio.EOF:
                return
            got += len(raw)
            del raw  # nothing of the message is kept here
        finished += 1
        if finished == connections:
            done.set()
        await context.write(b"ok")
        await context.read()  # until the client goes

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "residue.Sink", {"Send": grpc.stream_stream_rpc_method_handler(send)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.sleep(0.5)
    before = _rss_kib()
    port_file.write_text(str(port))
    await asyncio.wait_for(done.wait(), 600)
    await asyncio.sleep(1.0)  # let the last writes and frees settle
    print(before, _rss_kib(), flush=True)
    await server.stop(None)


async def send(port: int, connections: int, total: int, chunk: int) -> None:
    """C connections, two at a time, each sending ``total`` bytes in messages of ``chunk``; then they idle."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", LIMIT)])
                for _ in range(connections)]
    payload = b"\x01" * chunk
    two = asyncio.Semaphore(2)

    async def one(ch: grpc.aio.Channel) -> None:
        call = ch.stream_stream(METHOD)()
        async with two:
            sent = 0
            while sent < total:
                await call.write(payload[:min(chunk, total - sent)])
                sent += chunk
            await call.read()
        await asyncio.sleep(3600)

    await asyncio.gather(*(one(ch) for ch in channels))


def measure(connections: int, total: int, chunk: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="residue-") as tmp:
        port_file = Path(tmp) / "port"
        me = [sys.executable, __file__]
        srv = subprocess.Popen([*me, "--role", "server", "--port-file", str(port_file), "--connections",
                                str(connections), "--total", str(total)], stdout=subprocess.PIPE, text=True)
        try:
            t0 = time.time()
            while not port_file.exists() or not port_file.read_text():
                if srv.poll() is not None or time.time() - t0 > 30:
                    raise RuntimeError("the server did not start")
                time.sleep(0.05)
            cli = subprocess.Popen([*me, "--role", "client", "--port", port_file.read_text(), "--connections",
                                    str(connections), "--total", str(total), "--chunk", str(chunk)],
                                   stdout=subprocess.DEVNULL)
            try:
                out, _ = srv.communicate(timeout=600)
            finally:
                cli.kill()
                cli.wait()
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
    before, after = (int(v) for v in out.split())
    return {"connections": connections, "message_bytes": total, "chunk_bytes": chunk, "rss_before_mib": before / 1024,
            "rss_after_mib": after / 1024, "kept_mib_per_connection": (after - before) / 1024 / connections,
            "seconds": time.time() - t0, "load": load_average()}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--total", type=int, default=8_000_000, help="bytes each connection sends (a d = 10³ Gram)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[8_000_000, 1 << 20, 1 << 18],
                    help="message sizes to send the total in")
    ap.add_argument("--role", choices=["server", "client"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port-file", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.port_file, args.connections, args.total))
        return
    if args.role == "client":
        asyncio.run(send(args.port, args.connections, args.total, args.chunk))
        return
    if args.smoke:
        args.connections, args.total, args.chunks = 8, 1_000_000, [1_000_000, 1 << 18]
    results = []
    for chunk in args.chunks:
        r = measure(args.connections, args.total, min(chunk, args.total))
        results.append(r)
        print(f"  {chunk} B messages: {r['kept_mib_per_connection']:.3f} MiB kept a connection", flush=True)
    print_table(["connections", "sent each", "message", "RSS before MiB", "RSS after MiB", "kept MiB / connection"],
                [[r["connections"], r["message_bytes"], r["chunk_bytes"], f"{r['rss_before_mib']:.0f}",
                  f"{r['rss_after_mib']:.0f}", f"{r['kept_mib_per_connection']:.3f}"] for r in results])
    write_json(args.json, "grpc_residue", results)


if __name__ == "__main__":
    main()
