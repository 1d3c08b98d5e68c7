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
import sys
import uuid
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' namespaces, which the star is made of

from tests.netns import Network  # noqa: E402

PREFIX = "i22"
"""The start of the private loopback's namespace name (so that whoever lists namespaces knows whose it is)."""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


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
    except RuntimeError as exc:
        return f"cannot make shaped namespaces: {exc}"
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
    """``hosts`` behind one switch (``tests.netns.Network``: a bridge in a hub namespace, each host in a namespace of
    its own joined to it by a veth pair), both ends of every link shaped to ``rate`` (None: unshaped). Host h has
    address ``addr(h)`` on its interface ``iface``; ``link_bytes()`` reads every link's counters on the switch side."""

    iface = "eth0"
    """The link's name inside each host's namespace (the same in every one: what GLOO_SOCKET_IFNAME names)."""

    def __init__(self, hosts: Sequence[str], rate: str | None) -> None:
        self.rate = rate
        self.name = rate or "veth"
        self.hosts = list(hosts)
        self.net = Network(hosts, label="race")
        try:
            if rate is not None:
                for h in hosts:
                    self.net.rate(h, rate)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Star:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefix(self, host: str) -> list[str]:
        return self.net.cmd(host)

    def addr(self, host: str) -> str:
        return self.net.addr(host)

    def link_bytes(self) -> dict[str, tuple[int, int]]:
        """(bytes host h sent, bytes host h received) so far, for every host: its link's counters on the switch
        side (what the switch received from it, what it sent to it), Ethernet headers included."""
        stats = link_stats(self.net.hub)
        return {h: (stats[self.net.port(h)][1], stats[self.net.port(h)][0]) for h in self.hosts}

    def close(self) -> None:
        self.net.close()
