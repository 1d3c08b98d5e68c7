"""Time and bytes to accuracy through the real service on a constrained link: EF21 (Top-k) against GD.

The master runs in one network namespace and the n workers in another, joined by a veth pair whose both ends
are shaped with `tc netem` (rate and delay), so every round crosses a link with real bandwidth limits. Each run
goes until ‖∇f‖² < --tol (or --rounds); the table gives wall time, rounds and bytes (uplink + downlink, measured
by the master), and a plot shows ‖∇f‖² against wall time and against bytes. Needs root and iproute2 (tc);
without them it says so and runs on loopback.

    sudo python benchmarks/constrained_link.py --rates 100mbit 1gbit --delay 1ms
    python benchmarks/constrained_link.py --smoke       # tiny, as CI does
    python benchmarks/constrained_link.py --problem "phishing:/path/to/phishing:1:16:1"   # more problems

A problem is NAME:DATA:K:EF21_MULT:GD_MULT (the multipliers tuned by simulation for n workers; see README);
DATA is a dataset spec, or quadratic:D for the synthetic separable quadratic of dimension D.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

PY = sys.executable
# Tuned with `ef21 simulate --workers 8 ...` (mushrooms: EF21 Top-2 256x reaches 1e-7 in 580 rounds, GD 4x in 265).
DEFAULT_PROBLEMS = ["mushrooms:mushrooms:2:256:4"]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Link:
    """Two namespaces joined by a shaped veth pair (addresses 10.222.0.1/2 inside them only)."""

    def __init__(self, rate: str, delay: str) -> None:
        tag = uuid.uuid4().hex[:5]
        self.master_ns, self.worker_ns = f"ef21bm{tag}", f"ef21bw{tag}"
        self.rate, self.delay = rate, delay
        self.created: list[str] = []
        self.shaper = ""
        try:
            for ns in (self.master_ns, self.worker_ns):
                sh("ip", "netns", "add", ns)
                self.created.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            a, b = f"bm{tag}", f"bw{tag}"
            sh("ip", "link", "add", a, "netns", self.master_ns, "type", "veth", "peer", "name", b, "netns",
               self.worker_ns)
            for ns, dev, addr in ((self.master_ns, a, "10.222.0.1/24"), (self.worker_ns, b, "10.222.0.2/24")):
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                # Both directions shaped: the workers share one link to the master. netem gives rate and delay;
                # where the kernel lacks netem, a token bucket (tbf) gives the rate alone.
                try:
                    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", delay,
                       "rate", rate, "limit", "100000")
                    self.shaper = f"netem rate {rate} delay {delay}"
                except subprocess.CalledProcessError:
                    burst = "512kb" if rate.endswith("gbit") else "64kb"
                    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                       "burst", burst, "latency", "100ms")
                    self.shaper = f"tbf rate {rate} (no netem in this kernel: no added delay)"
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created = []

    def prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.master_ns if role == "master" else self.worker_ns]


def namespaces_available() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) missing"
    try:
        Link("100mbit", "1ms").close()
    except subprocess.CalledProcessError as exc:
        return f"cannot make shaped namespaces: {exc.stderr.strip()}"
    return None


def run_once(link: Link | None, data: str, method: str, k: int, mult: float, n: int, rounds: int, tol: float,
             log: Path, eval_every: int) -> dict:
    """One run through the service. The exact ‖∇f‖² needs every worker's dense gradient, which crosses the same
    link: it is taken every ``eval_every`` rounds (its bytes are reported apart, its time is in the wall time)."""
    host = "10.222.0.1" if link else "127.0.0.1"
    port = "50051" if link else str(_free_port())
    problem = (["--problem", "quadratic", "--dim", data.split(":")[1]] if data.startswith("quadratic:")
               else ["--data", data])
    master = [PY, "-m", "ef21.cli", "master", "--host", "0.0.0.0" if link else host, "--port", port,
              "--status-port", "-1", "--workers", str(n), *problem, "--method", method, "--k", str(k),
              "--stepsize-mult", str(mult), "--x0", "normal:0", "--rounds", str(rounds), "--tol", str(tol),
              "--eval-every", str(eval_every), "--log", str(log)]
    worker = [PY, "-m", "ef21_worker", "--master", f"{host}:{port}", "--connect-timeout", "60"]
    mp = subprocess.Popen((link.prefix("master") if link else []) + master, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    ws = [subprocess.Popen((link.prefix("worker") if link else []) + worker, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) for _ in range(n)]
    try:
        _, err = mp.communicate(timeout=3600)
        for w in ws:
            w.wait(timeout=60)
    finally:
        for p in [mp, *ws]:
            if p.poll() is None:
                p.kill()
    if mp.returncode != 0:
        raise RuntimeError(f"master failed: {err[-2000:]}")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    last = rows[-1]
    return {"rounds": last["round"], "grad_norm_sq": last["grad_norm_sq"], "wall_s": last["elapsed_s"],
            "bytes": last["wire_bytes_up"] + last["wire_bytes_down"], "bytes_up": last["wire_bytes_up"],
            "eval_bytes": last["eval_bytes"], "eval_every": eval_every,
            "reached": last["grad_norm_sq"] is not None and last["grad_norm_sq"] < tol, "log": str(log)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        rows = [x for x in map(json.loads, Path(r["log"]).read_text().splitlines()) if x["grad_norm_sq"] is not None]
        label = f"{r['problem']} {r['method']} {r['link']}"
        a.semilogy([x["elapsed_s"] for x in rows], [x["grad_norm_sq"] for x in rows], label=label)
        b.semilogy([x["wire_bytes_up"] + x["wire_bytes_down"] for x in rows], [x["grad_norm_sq"] for x in rows],
                   label=label)
    a.set_xlabel("wall time (s)")
    b.set_xlabel("bytes on the wire, up + down")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$")
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    ap.add_argument("--delay", default="1ms", help="one-way delay added on each end")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--problem", action="append", default=None, help="NAME:DATA:K:EF21_MULT:GD_MULT")
    ap.add_argument("--tol", type=float, default=1e-7)
    ap.add_argument("--eval-every", type=int, default=10, help="EF21's exact-gradient evaluations (GD: every round)")
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/constrained_link"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    problems = args.problem or DEFAULT_PROBLEMS
    if args.smoke:
        args.rates, args.workers, args.rounds, args.tol = args.rates[:1], 2, 20, 0.0
    reason = namespaces_available()
    if reason:
        print(f"network namespaces unavailable ({reason}): running on loopback, no bandwidth limit")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in problems:
        head, k, m_ef21, m_gd = spec.rsplit(":", 3)
        name, data = head.split(":", 1)
        for rate in (args.rates if not reason else ["loopback"]):
            for method, mult in (("ef21", float(m_ef21)), ("gd", float(m_gd))):
                link = None if reason else Link(rate, args.delay)
                try:
                    if link and not results:
                        print(f"link: {link.shaper}")
                    # GD's rounds are few and its messages are the gradients already: evaluate every round.
                    every = 1 if method == "gd" else args.eval_every
                    r = run_once(link, data, method, int(k), mult, args.workers, args.rounds, args.tol,
                                 args.out / f"{name}-{method}-{rate}.jsonl", every)
                finally:
                    if link:
                        link.close()
                r.update(problem=name, method=method, link=rate if reason is None else "loopback",
                         shaper=link.shaper if link else "none", n=args.workers, k=int(k), mult=mult)
                results.append(r)
                print(f"  {name} {method} {r['link']}: {r['wall_s']:.1f} s, {r['rounds']} rounds, "
                      f"{r['bytes'] / 1e6:.2f} MB, reached={r['reached']}", flush=True)
    print_table(["problem", "link", "method", "rounds", "wall s", "MB up+down", "eval MB", "reached tol"],
                [[r["problem"], r["link"], r["method"], r["rounds"], r["wall_s"], r["bytes"] / 1e6,
                  r["eval_bytes"] / 1e6, r["reached"]] for r in results])
    plot(results, args.out / "constrained_link.png")
    write_json(args.json, "constrained_link", results, tol=args.tol, namespaces=reason is None)


if __name__ == "__main__":
    main()
