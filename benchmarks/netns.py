"""Network namespaces for the benchmarks: a private loopback, and a star of shaped links (one switch, every process
in its own namespace behind its own link), with the bytes each link carried read from the kernel's counters.

Needs root and iproute2 (``ip``, ``tc``); ``unavailable()`` says why not, so a benchmark can fall back to the
host's loopback (and say so). Shaping is ``tc tbf`` (a token bucket: rate, no added delay), on both ends of every
link, so each process's link is limited in both directions as a NIC behind a switch port is. The kernel here has
no netem; where one has, delay could be added the same way.

Every namespace and interface carries a random tag after the prefix, so two benchmarks (or engineers) never collide,
and ``close`` (also on an exception) removes them: deleting a namespace deletes its interfaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from typing import Sequence

PREFIX = "i22"
"""The start of every name created here (this work's tag, so that whoever lists namespaces knows whose they are)."""
IFACE = "race0"
"""The name of the link inside each host's namespace (names are per namespace, so every host's is the same: what
GLOO_SOCKET_IFNAME names)."""
SUBNET = "10.122.0"


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def tbf_burst(rate: str) -> str:
    """A bucket big enough for the rate at the kernel's timer granularity (rate / HZ: 500 kB at 1 Gbit/s and
    HZ = 250), small enough not to let a burst through unshaped on slow links."""
    r = rate.lower()
    return "512kb" if r.endswith("gbit") else "64kb" if r.startswith("100") else "16kb"


def shape(ns: str, dev: str, rate: str) -> None:
    """Limit what ``dev`` (in namespace ``ns``) sends to ``rate`` with a token bucket."""
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
       "burst", tbf_burst(rate), "latency", "100ms")


def link_stats(ns: str | None) -> dict[str, tuple[int, int]]:
    """(tx bytes, rx bytes) of every interface of a namespace (None: this process's own), from the kernel."""
    cmd = ["ip", "-s", "-j", "link", "show"] if ns is None else ["ip", "-n", ns, "-s", "-j", "link", "show"]
    return {i["ifname"]: (int(i["stats64"]["tx"]["bytes"]), int(i["stats64"]["rx"]["bytes"]))
            for i in json.loads(sh(*cmd))}


def unavailable() -> str | None:
    """Why namespaces with shaped links cannot be made here, or None when they can (tried for real)."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) missing"
    try:
        with Star(["a"], "100mbit"):
            pass
    except subprocess.CalledProcessError as exc:
        return f"cannot make shaped namespaces: {(exc.stderr or '').strip()}"
    return None


class Loopback:
    """All processes on one loopback: in a fresh namespace of their own when ``private`` (root), so that ``lo``'s
    counter holds exactly what they sent; else on the host's loopback, bytes not measured."""

    def __init__(self, private: bool) -> None:
        self.ns = f"{PREFIX}l{uuid.uuid4().hex[:6]}" if private else None
        if self.ns is not None:
            sh("ip", "netns", "add", self.ns)
            try:
                sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            except BaseException:
                self.close()
                raise

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    name = "loopback"
    iface = "lo"

    def prefix(self, host: str) -> list[str]:
        return [] if self.ns is None else ["ip", "netns", "exec", self.ns]

    def addr(self, host: str) -> str:
        return "127.0.0.1"

    def sent(self) -> int | None:
        """Bytes sent on ``lo`` so far by everything in the namespace (None: the host's, not measured)."""
        return None if self.ns is None else link_stats(self.ns)["lo"][0]

    def close(self) -> None:
        if self.ns is not None:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
            self.ns = None


class Star:
    """``hosts`` behind one switch: a bridge in a hub namespace and, for each host, a namespace joined to the bridge
    by a veth pair whose two ends are both shaped to ``rate`` (None: unshaped). Host h has address ``addr(h)`` on
    its interface ``IFACE``; ``link_bytes()`` reads every link's counters on the switch side."""

    iface = IFACE

    def __init__(self, hosts: Sequence[str], rate: str | None) -> None:
        self.rate = rate
        self.name = rate or "veth"
        tag = uuid.uuid4().hex[:5]
        self.hub = f"{PREFIX}h{tag}"
        self.hosts = list(hosts)
        self._ns = {h: f"{PREFIX}{tag}{h}" for h in hosts}
        self._port = {h: f"{PREFIX}{tag}{h}" for h in hosts}  # the switch's end, in the hub namespace
        self._addr = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(hosts)}
        self._made: list[str] = []
        try:
            self._add_ns(self.hub)
            sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for h in hosts:
                ns, port = self._ns[h], self._port[h]
                self._add_ns(ns)
                sh("ip", "link", "add", port, "netns", self.hub, "type", "veth", "peer", "name", IFACE, "netns", ns)
                sh("ip", "-n", self.hub, "link", "set", port, "master", "br0")
                sh("ip", "-n", self.hub, "link", "set", port, "up")
                sh("ip", "-n", ns, "addr", "add", f"{self._addr[h]}/24", "dev", IFACE)
                sh("ip", "-n", ns, "link", "set", IFACE, "up")
                if rate is not None:
                    shape(ns, IFACE, rate)
                    shape(self.hub, port, rate)
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self._made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def __enter__(self) -> Star:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self._ns[host]]

    def addr(self, host: str) -> str:
        return self._addr[host]

    def link_bytes(self) -> dict[str, tuple[int, int]]:
        """(bytes host h sent, bytes host h received) so far, for every host: its link's counters on the switch
        side (what the switch received from it, what it sent to it), Ethernet headers included."""
        stats = link_stats(self.hub)
        return {h: (stats[self._port[h]][1], stats[self._port[h]][0]) for h in self.hosts}

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []
