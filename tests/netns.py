"""Real networks for tests and benchmarks: nodes in their own network namespaces on a bridge, and the faults a
real network has — a link down, a host black-holed, loss, a slow link, latency with jitter.

    hub namespace:  bridge br0 ── v-<node> ═══ veth ═══ eth0 (10.77.0.k/24) in namespace <node>

Each ``Network`` has its own hub, so networks may use the same addresses side by side. Everything lives in
namespaces made here and named with a prefix of this checkout's folder and a random tag; ``close`` (or the
context manager) deletes them all. Needs root and iproute2; ``unavailable()`` says why not, for a skip.

The faults and how they are made (this kernel has no netem, so no delay or loss from ``tc``):

- **link down** (``link_down``): the hub's end of the node's veth is set down — a cable pulled: packets vanish,
  no RST, no ICMP;
- **black hole** (``blackhole``): iptables DROP on INPUT in the node's namespace and, in every other node's, for
  packets from it — the host is there but answers nothing;
- **loss** (``loss``): iptables ``-m statistic --mode random --probability p -j DROP`` on the receiver's INPUT;
- **rate** (``rate``): ``tc tbf`` on both ends of the node's veth;
- **latency and jitter** (``relay``): a user-space TCP relay (``python -m tests.netns relay``) in the node's
  namespace between the local process and the far end; it holds each chunk a seeded random time in [lo, hi]
  and keeps their order (a chunk never overtakes the one before it).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import random
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def unavailable(*, faults: bool = True) -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None. ``faults``: iptables and tc must work in them
    too (every fault but a link down needs one of them)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "iptables") if faults else ("ip",):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        with Network(["a"]) as net:
            if faults:
                net.run("a", "iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random", "--probability",
                        "0.5", "-j", "DROP")
                net.rate("a", "10mbit")
    except RuntimeError as exc:
        return f"cannot make namespaces{' with iptables and tc' if faults else ''} here: {exc}"
    return None


class Network:
    """Nodes on one bridge; ``addr(node)`` is a node's address as the others reach it."""

    def __init__(self, nodes: Sequence[str], *, label: str = "") -> None:
        checkout = Path(__file__).resolve().parents[1].name[:8]
        self.prefix = f"ef21-{checkout}-{label + '-' if label else ''}{uuid.uuid4().hex[:6]}"
        self.hub = f"{self.prefix}-hub"
        self.nodes = list(nodes)
        self._made: list[str] = []
        try:
            self._add_ns(self.hub)
            sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for i, node in enumerate(self.nodes):
                ns = self.ns(node)
                self._add_ns(ns)
                sh("ip", "-n", self.hub, "link", "add", f"v-{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                sh("ip", "-n", self.hub, "link", "set", f"v-{i}", "master", "br0")
                sh("ip", "-n", self.hub, "link", "set", f"v-{i}", "up")
                sh("ip", "-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self._made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def addr(self, node: str) -> str:
        return f"{SUBNET}.{self.nodes.index(node) + 2}"

    def port(self, node: str) -> str:
        """The switch's end of the node's link (in the hub namespace)."""
        return f"v-{self.nodes.index(node)}"

    # -- running things in a node --------------------------------------------------------------------------------

    def cmd(self, node: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *args]

    def run(self, node: str, *args: str) -> None:
        sh(*self.cmd(node, *args))

    def popen(self, node: str, args: Sequence[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(node, *args), **kw)

    def call_in(self, node: str, fn: Callable[[], T]) -> T:
        """``fn()`` run in the node's namespace (a thread of its own joins it: sockets it opens live there)."""
        out: list[Any] = []

        def target() -> None:
            try:
                with open(f"/run/netns/{self.ns(node)}") as f:
                    if ctypes.CDLL(None, use_errno=True).setns(f.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                out.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                out.append((False, exc))

        t = threading.Thread(target=target, name=f"in-{node}")
        t.start()
        t.join()
        ok, value = out[0]
        if not ok:
            raise value
        return value

    # -- faults ----------------------------------------------------------------------------------------------------

    def link_down(self, node: str) -> None:
        sh("ip", "-n", self.hub, "link", "set", self.port(node), "down")

    def link_up(self, node: str) -> None:
        sh("ip", "-n", self.hub, "link", "set", self.port(node), "up")

    def blackhole(self, node: str, on: bool = True) -> None:
        """Everything to and from ``node`` silently dropped (no RST, no ICMP); ``on=False`` lifts it."""
        op = "-I" if on else "-D"
        self.run(node, "iptables", op, "INPUT", "-j", "DROP")
        for other in self.nodes:
            if other != node:
                self.run(other, "iptables", op, "INPUT", "-s", self.addr(node), "-j", "DROP")

    def loss(self, sender: str, receiver: str, p: float) -> None:
        """Drop a random fraction ``p`` of the packets ``sender`` sends to ``receiver``."""
        self.run(receiver, "iptables", "-A", "INPUT", "-s", self.addr(sender), "-m", "statistic", "--mode",
                 "random", "--probability", f"{p:g}", "-j", "DROP")

    def rate(self, node: str, rate: str, *, delay: str | None = None, latency: str = "100ms") -> str:
        """Both directions of the node's link at ``rate`` (tc on each end of its veth); returns how. ``delay``:
        added each way too, where the kernel has netem (else the rate alone, with a token bucket whose queue
        holds ``latency`` worth of bytes)."""
        burst = "512kb" if rate.endswith("gbit") else "64kb" if rate.startswith("100") else "16kb"
        how = ""
        for ns, dev in ((self.ns(node), "eth0"), (self.hub, self.port(node))):
            tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"]
            if delay is not None:
                try:
                    sh(*tc, "netem", "delay", delay, "rate", rate, "limit", "100000")
                    how = f"netem rate {rate} delay {delay}"
                    continue
                except RuntimeError:
                    pass
            sh(*tc, "tbf", "rate", rate, "burst", burst, "latency", latency)
            how = f"tbf rate {rate}" + (" (no netem in this kernel: no added delay)" if delay is not None else "")
        return how

    def relay(self, node: str, listen_port: int, target: str, *, delay_ms: tuple[float, float] = (30.0, 50.0),
              both_ways: bool = False, seed: int = 0) -> subprocess.Popen:
        """A latency relay in ``node``: 127.0.0.1:``listen_port`` there reaches ``target`` (HOST:PORT) with each
        chunk it sends upstream (and downstream with ``both_ways``) held a random [lo, hi] ms, in order."""
        lo, hi = delay_ms
        args = [sys.executable, "-m", "tests.netns", "relay", f"127.0.0.1:{listen_port}", target,
                "--delay-ms", f"{lo:g}:{hi:g}", "--seed", str(seed)] + (["--both-ways"] if both_ways else [])
        p = self.popen(node, args, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "listening":
            p.kill()
            raise RuntimeError(f"relay in {node} did not start")
        return p


# -- the relay ---------------------------------------------------------------------------------------------------


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: tuple[float, float] | None,
                 rng: random.Random) -> None:
    """Copy one direction, each chunk held a random time (never overtaking the previous one); EOF passes on."""
    loop = asyncio.get_running_loop()
    due = 0.0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if delay is not None:
                due = max(due, loop.time() + rng.uniform(*delay))
                await asyncio.sleep(due - loop.time())
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def _serve_relay(listen: str, target: str, delay_ms: tuple[float, float], both_ways: bool, seed: int) -> None:
    host, port = listen.rsplit(":", 1)
    t_host, t_port = target.rsplit(":", 1)
    delay = (delay_ms[0] / 1000, delay_ms[1] / 1000)
    count = 0

    async def handle(r_in: asyncio.StreamReader, w_in: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        up_rng, down_rng = random.Random(f"{seed}:{count}:up"), random.Random(f"{seed}:{count}:down")
        try:
            r_out, w_out = await asyncio.open_connection(t_host, int(t_port))
        except OSError:
            w_in.transport.abort()
            return
        # Sending chunks as they come (no Nagle) keeps the added delay the relay's own.
        for w in (w_in, w_out):
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_carry(r_in, w_out, delay, up_rng),
                             _carry(r_out, w_in, delay if both_ways else None, down_rng))
        for w in (w_in, w_out):
            w.close()

    server = await asyncio.start_server(handle, host, int(port))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.netns")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="a TCP relay adding latency and jitter")
    r.add_argument("listen")
    r.add_argument("target")
    r.add_argument("--delay-ms", default="30:50")
    r.add_argument("--both-ways", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args(argv)
    lo, hi = (float(v) for v in ns.delay_ms.split(":"))
    try:
        asyncio.run(_serve_relay(ns.listen, ns.target, (lo, hi), ns.both_ways, ns.seed))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
