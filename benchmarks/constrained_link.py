"""Time and bytes to accuracy through the real service on a constrained link: EF21 (Top-k) against GD.

The master runs in one network namespace and the n workers in another, joined by a veth pair whose both ends
are shaped with `tc` (netem rate and delay where the kernel has netem, else a tbf token bucket: rate only), so
every round crosses a link with real bandwidth limits. Needs root and iproute2; without them it says so and
runs on loopback.

Measuring ‖∇f‖² on the way would put dense gradients on the same link and slow the method being timed, so the
number of rounds each method needs to reach --tol is found first with the simulator (which gives the service's
iterates bit for bit); the service then runs exactly that many rounds and evaluates ‖∇f‖² once, at the end, to
confirm. Wall time is from the start of round 0 to the close of the round that produces the final iterate;
bytes are every Update and RoundResult, as measured by the master. Methods: GD (dense), EF21 (Top-k), and EF21
with the compact encoding (float32 uplink values, Elias–Fano indices).

    sudo python benchmarks/constrained_link.py                     # the README table (~15 min)
    python benchmarks/constrained_link.py --smoke                  # tiny, as CI does
    python benchmarks/constrained_link.py --problem "phishing:/path/to/phishing:2:16:1"   # more problems

A problem is NAME:DATA:K:EF21_MULT:GD_MULT[:RATE/RATE...] (multipliers tuned by simulation for n workers; the
optional rates override --rates for that problem); DATA is a dataset spec, or quadratic:D for the synthetic
separable quadratic of dimension D.
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
# Tuned with `ef21 simulate --workers 8 ...`: mushrooms EF21 Top-2 256x reaches 1e-7 in 580 rounds, GD 4x in
# 265; the quadratic (d = 10^6) EF21 Top-10^4 32x in ~880 rounds, GD 1x in 17 (each GD round moves 128 MB, so
# it runs on the fastest link only).
DEFAULT_PROBLEMS = ["mushrooms:mushrooms:2:256:4", "quad-1e6:quadratic:1000000:10000:32:1:1gbit"]
METHODS = (("gd", "plain"), ("ef21", "plain"), ("ef21", "compact"))


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
                    burst = "512kb" if rate.endswith("gbit") else "64kb" if rate.startswith("100") else "16kb"
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


def rounds_to_tol(data: str, method: str, encoding: str, k: int, mult: float, n: int, tol: float,
                  max_rounds: int) -> tuple[int, list[float]]:
    """Rounds the method needs to reach tol, and ‖∇f(x^t)‖² for t = 0..R: from the simulator."""
    from ef21.config import RunConfig
    from ef21.simulate import simulate

    problem = dict(problem="quadratic", dim=int(data.split(":")[1])) if data.startswith("quadratic:") else dict(
        data=data)
    cfg = RunConfig(workers=n, method=method, k=k, stepsize_mult=mult, x0="normal:0", rounds=max_rounds, tol=tol,
                    encoding=encoding, **problem)  # type: ignore[arg-type]
    res = simulate(cfg)
    return res.records[-1].round, [r.grad_norm_sq for r in res.records]


def run_once(link: Link | None, data: str, method: str, encoding: str, k: int, mult: float, n: int, rounds: int,
             log: Path) -> dict:
    """Exactly ``rounds`` rounds through the service; ‖∇f‖² is evaluated at the last round only."""
    host = "10.222.0.1" if link else "127.0.0.1"
    port = "50051" if link else str(_free_port())
    problem = (["--problem", "quadratic", "--dim", data.split(":")[1]] if data.startswith("quadratic:")
               else ["--data", data])
    master = [PY, "-m", "ef21.cli", "master", "--host", "0.0.0.0" if link else host, "--port", port,
              "--status-port", "-1", "--workers", str(n), *problem, "--method", method, "--k", str(k),
              "--stepsize-mult", str(mult), "--x0", "normal:0", "--rounds", str(rounds), "--encoding", encoding,
              "--eval-every", str(10**9), "--log", str(log)]
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
    # x^R exists on every replica once round R-1 has closed; round R only evaluates it.
    at = rows[-2] if len(rows) > 1 else rows[-1]
    return {"rounds": rows[-1]["round"], "grad_norm_sq": rows[-1]["grad_norm_sq"], "wall_s": at["elapsed_s"],
            "bytes": at["wire_bytes_up"] + at["wire_bytes_down"], "bytes_up": at["wire_bytes_up"],
            "elapsed": [r["elapsed_s"] for r in rows],
            "cum_bytes": [r["wire_bytes_up"] + r["wire_bytes_down"] for r in rows], "log": str(log)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(results: list[dict], out: Path) -> None:
    """One column per problem: ‖∇f(x^t)‖² (from the simulation, the same iterates) against the service's wall
    time (top) and bytes (bottom) at which x^t existed, i.e. at the close of round t − 1. Colour: method;
    line style: link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in results))
    links = list(dict.fromkeys(r["link"] for r in results))
    colours = {"gd": "tab:red", "ef21": "tab:blue", "ef21-compact": "tab:green"}
    styles = ["-", "--", "-.", ":"]
    fig, axes = plt.subplots(2, len(problems), figsize=(4.6 * len(problems), 7.5), squeeze=False)
    for col, name in enumerate(problems):
        top, bottom = axes[0][col], axes[1][col]
        for r in (r for r in results if r["problem"] == name):
            gn = r["curve"]
            times = [0.0, *r["elapsed"][: len(gn) - 1]]
            sent = [1, *r["cum_bytes"][: len(gn) - 1]]
            kw = dict(color=colours.get(r["method"], "k"), ls=styles[links.index(r["link"]) % len(styles)],
                      label=f"{r['method']} {r['link']}")
            top.semilogy(times, gn, **kw)
            bottom.loglog(sent, gn, **kw)
        top.set_title(f"{name} (n = {results[0]['n']})")
        top.set_xlabel("wall time (s)")
        bottom.set_xlabel("bytes on the wire, up + down")
        for ax in (top, bottom):
            ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$")
            ax.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def replot(path: Path, out: Path) -> None:
    """Redraw the figure from a results JSON and the service logs next to it (curves simulated if absent)."""
    doc = json.loads(path.read_text())
    results = doc["results"]
    cache: dict[tuple, list[float]] = {}
    for r in results:
        rows = [json.loads(line) for line in Path(r["log"]).read_text().splitlines()]
        r["elapsed"] = [x["elapsed_s"] for x in rows]
        r["cum_bytes"] = [x["wire_bytes_up"] + x["wire_bytes_down"] for x in rows]
        if "curve" not in r:
            key = (r["problem"], r["method"])
            if key not in cache:
                method, _, enc = r["method"].partition("-")
                cache[key] = rounds_to_tol(r["data"], method, enc or "plain", r["k"], r["mult"], r["n"], doc["tol"],
                                           r["rounds"])[1]
            r["curve"] = cache[key]
    plot(results, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["1mbit", "10mbit", "100mbit", "1gbit"])
    ap.add_argument("--delay", default="1ms", help="one-way delay added on each end (netem only)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--problem", action="append", default=None, help="NAME:DATA:K:EF21_MULT:GD_MULT[:RATES]")
    ap.add_argument("--tol", type=float, default=1e-7)
    ap.add_argument("--max-rounds", type=int, default=20000, help="give up on a method that needs more")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/constrained_link"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON",
                    help="only redraw the figure from an earlier run's JSON and logs")
    args = ap.parse_args()
    if args.replot:
        replot(args.replot, args.out / "constrained_link.png")
        return
    problems = args.problem or DEFAULT_PROBLEMS
    if args.smoke:
        args.rates, args.workers, args.tol = args.rates[-1:], 2, 1e-2
        problems = ["mushrooms:mushrooms:2:64:4"]  # ~80 and ~320 rounds
    reason = namespaces_available()
    if reason:
        print(f"network namespaces unavailable ({reason}): running on loopback, no bandwidth limit")
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    differ: list[str] = []  # runs whose final iterate is not the simulation's: the timings would be of another run
    for spec in problems:
        fields = spec.split(":")
        rates = args.rates
        if fields[-1].endswith("bit") or "/" in fields[-1]:
            rates = fields.pop().split("/")
        name, data, (k, m_ef21, m_gd) = fields[0], ":".join(fields[1:-3]), fields[-3:]
        for method, encoding in METHODS:
            mult = float(m_gd if method == "gd" else m_ef21)
            t0 = time.perf_counter()
            need, curve = rounds_to_tol(data, method, encoding, int(k), mult, args.workers, args.tol,
                                        args.max_rounds)
            print(f"  {name} {method}/{encoding}: {need} rounds to {args.tol:g} (simulated in "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
            for rate in (rates if not reason else ["loopback"]):
                link = None if reason else Link(rate, args.delay)
                try:
                    r = run_once(link, data, method, encoding, int(k), mult, args.workers, need,
                                 args.out / f"{name}-{method}-{encoding}-{rate}.jsonl")
                finally:
                    if link:
                        link.close()
                label = method if encoding == "plain" else f"{method}-{encoding}"
                r.update(problem=name, data=data, method=label, link=rate,
                         shaper=link.shaper if link else "none",
                         n=args.workers, k=int(k), mult=mult, reached=r["grad_norm_sq"] < args.tol, curve=curve,
                         same_as_simulation=r["grad_norm_sq"] == curve[-1])
                if not r["same_as_simulation"]:
                    differ.append(f"{name} {label} {rate}: the service ended at |grad f|^2 = {r['grad_norm_sq']!r}, "
                                  f"the simulation at {curve[-1]!r}")
                results.append(r)
                print(f"    {rate}: {r['wall_s']:.1f} s, {r['bytes'] / 1e6:.2f} MB, final |grad f|^2 "
                      f"{r['grad_norm_sq']:.3g}", flush=True)
    if results and results[0]["shaper"] != "none":
        print(f"link: {results[0]['shaper']}")
    by = {(r["problem"], r["link"], r["method"]): r for r in results}
    rows = []
    for r in results:
        gd = by.get((r["problem"], r["link"], "gd"))
        rows.append([r["problem"], r["link"], r["method"], r["rounds"], r["wall_s"], r["bytes"] / 1e6,
                     "-" if gd is None else gd["wall_s"] / r["wall_s"], "-" if gd is None else gd["bytes"] / r["bytes"],
                     r["reached"]])
    print(f"\nTime and bytes to |grad f|^2 < {args.tol:g}, n = {args.workers} (speed-up = GD / this method)")
    print_table(["problem", "link", "method", "rounds", "wall s", "MB up+down", "time gain", "byte gain",
                 "reached"], rows)
    plot(results, args.out / "constrained_link.png")
    for r in results:  # the logs have these; the curve (simulated) is kept for --replot
        del r["elapsed"], r["cum_bytes"]
    write_json(args.json, "constrained_link", results, tol=args.tol, namespaces=reason is None)
    if differ:
        sys.exit("constrained_link: not the simulated run: " + "; ".join(differ))


if __name__ == "__main__":
    main()
