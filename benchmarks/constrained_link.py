"""Time and bytes to accuracy through the real service on a constrained link: GD against EF21 and EF21-BC.

The master runs in one network namespace and the n workers in another (tests/netns.py), the workers' link shaped
both ways with `tc` (netem rate and delay where the kernel has netem, else a tbf token bucket: rate only), so
every round crosses a link with real bandwidth limits. Needs root and iproute2; without them it says so and
runs on loopback.

Measuring ‖∇f‖² on the way would put dense gradients on the same link and slow the method being timed, so the
number of rounds each method needs to reach its target is found first with the simulator (which gives the
service's iterates bit for bit); the service then runs exactly that many rounds and evaluates ‖∇f‖² once, at the
end, to confirm. The target is ‖∇f‖² < 1e-7, or for the sparse problem a reduction of ‖∇f‖² by 10⁴ from its
start. Wall time is from the start of round 0 to the close of the round that produces the final iterate; bytes
are every Update and RoundResult (serialized, plus gRPC's 5-byte prefix), as measured by the master.

Each problem carries its methods with their settings, tuned with `ef21 simulate` for n = 8 (see PROBLEMS); the
raw per-round logs go to a scratch folder (or --logs DIR) and the JSON keeps a thinned trace of each run, enough
to redraw the figure (--replot).

    sudo python benchmarks/constrained_link.py                         # mushrooms and the sparse problem
    sudo python benchmarks/constrained_link.py --problem phishing --data-dir /path/to/libsvm
    python benchmarks/constrained_link.py --smoke                      # tiny, as CI does
    python benchmarks/constrained_link.py --replot benchmarks/results/constrained_link.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The n worker processes stand for n machines but share this machine's cores; with BLAS's own threads they fight
# over them (a9a's gradient, 4070 x 123: 0.4 ms on one thread, 17-30 ms on two when 8 workers share 2 cores).
# One thread each, in this process too: the simulation then computes exactly as the workers do.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/netns.py
from common import add_logs_arg, config_flags, logs_dir, print_table, thin, write_json  # noqa: E402

from ef21.engine.config import RunConfig  # noqa: E402

PY = sys.executable


@dataclass(frozen=True)
class Method:
    label: str
    method: str
    stepsize_mult: float
    k: int | None = None
    downlink_k: int | None = None
    encoding: str = "plain"
    init: str = "full"


@dataclass(frozen=True)
class Problem:
    name: str
    data: str
    """A dataset spec (a path is looked up in --data-dir), or quadratic:D."""
    methods: tuple[Method, ...]
    rates: tuple[str, ...]
    tol: float | None = 1e-7
    reduction: float | None = None
    """Instead of tol: lower ‖∇f‖² by this factor from ‖∇f(x⁰)‖²."""
    lam: float = 0.1
    x0: str = "zeros"
    cap: int | None = None
    """Run at most this many rounds of a method through the service and extrapolate its time and bytes (GD on
    the sparse problem: each of its rounds moves the same 173 MB, so the rest is arithmetic)."""


def _ef21(k: int, mult: float, big_k: int | None = None) -> tuple[Method, Method]:
    """A method with g_i⁰ compressed (Algorithm 1: round 0 sends k entries, not d), plain and compact."""
    label = "ef21" if big_k is None else "ef21-bc"
    return (Method(label, "ef21", mult, k, big_k, init="compressed"),
            Method(f"{label}-compact", "ef21", mult, k, big_k, init="compressed", encoding="compact"))


# Tuned with `ef21 simulate --workers 8 --x0 zeros` on grids of multipliers, k, K and g_i⁰ (full or compressed):
# the fewest bytes to the target, estimated from the entries sent. GD: the best of 1x/2x/4x.
PROBLEMS = {
    "mushrooms": Problem("mushrooms", "mushrooms", (
        Method("gd", "gd", 4.0), *_ef21(4, 512.0), *_ef21(4, 384.0, 12)), ("1mbit", "10mbit", "100mbit", "1gbit")),
    "phishing": Problem("phishing", "phishing", (
        Method("gd", "gd", 1.0), _ef21(16, 8.0)[0], _ef21(16, 8.0, 32)[0]), ("1mbit", "100mbit")),
    "a9a": Problem("a9a", "a9a", (
        Method("gd", "gd", 2.0), _ef21(32, 16.0)[0], _ef21(16, 32.0, 16)[0]), ("1mbit", "100mbit")),
    # λ = 1e-3: at the default 0.1 the regularizer's curvature (2λ) makes the problem so well conditioned that GD
    # lowers ‖∇f‖² by 10⁴ in 2 rounds, which no compressed method can undercut (it must first reach the features).
    "sparse": Problem("sparse", "synthetic-sparse:20000:1350000:3e-4", (
        Method("gd", "gd", 2.0), _ef21(10_000, 256.0)[0], *_ef21(10_000, 256.0, 10_000)), ("100mbit",), tol=None,
        reduction=1e4, lam=1e-3, cap=30),
    "quad-1e6": Problem("quad-1e6", "quadratic:1000000", (
        Method("gd", "gd", 1.0), _ef21(10_000, 32.0, 10_000)[0]), ("1gbit",)),
}
DEFAULT_PROBLEMS = ("mushrooms", "sparse")
SMOKE = Problem("mushrooms", "mushrooms", (Method("gd", "gd", 4.0), _ef21(2, 64.0)[0], _ef21(2, 64.0, 8)[0]),
                ("1gbit",), tol=1e-2)


def run_config(p: Problem, m: Method, n: int, rounds: int, tol: float = 0.0) -> RunConfig:
    problem = (dict(problem="quadratic", dim=int(p.data.split(":")[1])) if p.data.startswith("quadratic:")
               else dict(data=p.data, lam=p.lam))
    return RunConfig(workers=n, method=m.method, k=m.k, downlink_k=m.downlink_k, stepsize_mult=m.stepsize_mult,
                     encoding=m.encoding, init=m.init, x0=p.x0, rounds=rounds, tol=tol,
                     **problem)  # type: ignore[arg-type]


class Link:
    """The master in one namespace and the n workers in another (tests/netns.py), the workers' link shaped both
    ways: they share it to the master, as workers behind one uplink do."""

    def __init__(self, rate: str, delay: str) -> None:
        from tests.netns import Network

        self.net = Network(["master", "workers"], label="bench")
        try:
            self.shaper = self.net.rate("workers", rate, delay=delay)
        except BaseException:
            self.net.close()
            raise
        self.master_host = self.net.addr("master")

    def close(self) -> None:
        self.net.close()

    def prefix(self, role: str) -> list[str]:
        return self.net.cmd("master" if role == "master" else "workers")


def namespaces_available() -> str | None:
    from tests.netns import unavailable

    return unavailable()


def simulate_to_target(p: Problem, m: Method, n: int, max_rounds: int) -> tuple[int, list[float], float]:
    """(R, ‖∇f(x^t)‖² for t = 0..R, the target): the rounds the method needs, from the simulator."""
    from ef21.engine.simulate import simulate

    tol = p.tol
    if tol is None:
        assert p.reduction is not None
        tol = simulate(run_config(p, m, n, 0)).records[0].grad_norm_sq / p.reduction
    res = simulate(run_config(p, m, n, max_rounds, tol))
    curve = [r.grad_norm_sq for r in res.records]
    return res.records[-1].round, curve, tol


def run_once(link: Link | None, cfg: RunConfig, log: Path) -> dict:
    """Exactly ``cfg.rounds`` rounds through the service; ‖∇f‖² is evaluated at the last round only."""
    host = link.master_host if link else "127.0.0.1"
    port = "50051" if link else str(_free_port())
    master = [PY, "-m", "ef21", "master", "--host", "0.0.0.0" if link else host, "--port", port,
              "--status-port", "-1", *config_flags(cfg), "--eval-every", str(10**9), "--log", str(log)]
    worker = [PY, "-m", "ef21_worker", "--master", f"{host}:{port}", "--connect-timeout", "60"]
    mp = subprocess.Popen((link.prefix("master") if link else []) + master, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    ws = [subprocess.Popen((link.prefix("worker") if link else []) + worker, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) for _ in range(cfg.workers)]
    try:
        _, err = mp.communicate(timeout=4 * 3600)
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
    n = cfg.workers
    steady = rows[2:-1] or rows[1:]
    return {"rounds": rows[-1]["round"], "grad_norm_sq": rows[-1]["grad_norm_sq"], "wall_s": at["elapsed_s"],
            "bytes": at["wire_bytes_up"] + at["wire_bytes_down"], "bytes_up": at["wire_bytes_up"],
            # Message sizes of a steady round: the Update's (mean over workers) and one worker's RoundResult.
            "update_bytes": steady[-1]["uplink_msg_bytes"],
            "result_bytes": (steady[-1]["wire_bytes_down"] - steady[0]["wire_bytes_down"])
            / max(1, n * (steady[-1]["round"] - steady[0]["round"])),
            "elapsed": [r["elapsed_s"] for r in rows],
            "cum_bytes": [r["wire_bytes_up"] + r["wire_bytes_down"] for r in rows]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extrapolate(r: dict, need: int) -> dict:
    """A capped run's time and bytes at ``need`` rounds: rounds 0-1 as measured, every later round as the mean
    of the measured ones (GD's rounds all move the same bytes). x^t exists at record t − 1's time and bytes."""
    ran = r["rounds"]
    per_s = (r["elapsed"][ran - 1] - r["elapsed"][1]) / (ran - 2)
    per_b = (r["cum_bytes"][ran - 1] - r["cum_bytes"][1]) / (ran - 2)
    more = range(1, need - ran + 2)
    elapsed = [*r["elapsed"][:ran], *(r["elapsed"][ran - 1] + per_s * i for i in more)]
    cum = [*r["cum_bytes"][:ran], *(r["cum_bytes"][ran - 1] + per_b * i for i in more)]
    return dict(r, rounds=need, measured_rounds=ran, extrapolated=True, elapsed=elapsed, cum_bytes=cum,
                wall_s=elapsed[need - 1], bytes=cum[need - 1])


def trace(r: dict, curve: list[float]) -> list[list[float]]:
    """(round t, wall time and bytes at which x^t existed — the close of round t − 1 —, ‖∇f(x^t)‖²), thinned."""
    times = [0.0, *r["elapsed"][: len(curve) - 1]]
    sent = [0, *r["cum_bytes"][: len(curve) - 1]]
    return [[t, times[t], sent[t], curve[t]] for t in thin(curve)]


def plot(results: list[dict], out: Path) -> None:
    """One column per problem: ‖∇f(x^t)‖² against the service's wall time (top) and bytes (bottom) at which x^t
    existed. Colour: method; line style: link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in results))
    links = list(dict.fromkeys(r["link"] for r in results))
    colours = {"gd": "tab:red", "ef21": "tab:blue", "ef21-compact": "tab:cyan", "ef21-bc": "tab:green",
               "ef21-bc-compact": "tab:olive"}
    styles = ["-", "--", "-.", ":"]
    fig, axes = plt.subplots(2, len(problems), figsize=(4.8 * len(problems), 7.5), squeeze=False)
    for col, name in enumerate(problems):
        top, bottom = axes[0][col], axes[1][col]
        for r in (r for r in results if r["problem"] == name):
            pts = r["trace"]
            kw = dict(color=colours.get(r["method"], "k"), ls=styles[links.index(r["link"]) % len(styles)],
                      label=f"{r['method']} {r['link']}" + (" (extrapolated)" if r.get("extrapolated") else ""))
            top.semilogy([p[1] for p in pts], [p[3] for p in pts], **kw)
            bottom.loglog([max(p[2], 1) for p in pts], [p[3] for p in pts], **kw)
        top.set_title(f"{name} (n = {results[0]['n']})")
        top.set_xlabel("wall time (s)")
        bottom.set_xlabel("bytes on the wire, up + down")
        for ax in (top, bottom):
            ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$")
            ax.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def resolve_data(p: Problem, data_dir: Path | None) -> Problem:
    """A problem whose data is a file name is read from --data-dir (phishing, a9a: not shipped)."""
    if p.data in ("mushrooms",) or ":" in p.data:
        return p
    if data_dir is None:
        raise SystemExit(f"--problem {p.name} needs --data-dir (a folder with the LIBSVM file {p.data!r})")
    return dataclasses.replace(p, data=str(data_dir / p.data))


def table(results: list[dict]) -> None:
    """The gains over GD, and where they come from: a method moves fewer bytes than GD exactly when it needs
    fewer than (GD's bytes a round) / (its bytes a round) times GD's rounds, the break-even column."""
    by = {(r["problem"], r["link"], r["method"]): r for r in results}
    rows = []
    for r in results:
        gd = by.get((r["problem"], r["link"], "gd"))
        per_round = r["update_bytes"] + r["result_bytes"]
        rows.append([r["problem"], r["link"], r["method"], r["rounds"], r["wall_s"], r["bytes"] / 1e6,
                     round(r["update_bytes"]), round(r["result_bytes"]),
                     "-" if gd is None else r["rounds"] / gd["rounds"],
                     "-" if gd is None else (gd["update_bytes"] + gd["result_bytes"]) / per_round,
                     "-" if gd is None else gd["wall_s"] / r["wall_s"], "-" if gd is None else gd["bytes"] / r["bytes"],
                     r["reached"], "x" if r.get("extrapolated") else ""])
    print("\nTime and bytes to the target (gain = GD / this method; rounds/GD against the break-even ratio of "
          "bytes a round; x: extrapolated from a capped run)")
    print_table(["problem", "link", "method", "rounds", "wall s", "MB up+down", "Update B", "Result B", "rounds/GD",
                 "break-even", "time gain", "byte gain", "reached", ""], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", action="append", choices=sorted(PROBLEMS), default=None,
                    help=f"repeatable (default: {', '.join(DEFAULT_PROBLEMS)})")
    ap.add_argument("--rates", nargs="+", default=None, help="override the problems' link rates")
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods (labels)")
    ap.add_argument("--data-dir", type=Path, default=None, help="where the LIBSVM files phishing and a9a are")
    ap.add_argument("--delay", default="1ms", help="one-way delay added on each end (netem only)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-rounds", type=int, default=20000, help="give up on a method that needs more")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/constrained_link"), help="figure folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--update", action="store_true",
                    help="keep the results of the problems not run now that --json already holds (one table, one "
                         "figure from runs made at different times)")
    add_logs_arg(ap)
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only redraw the figure from a JSON")
    args = ap.parse_args()
    if args.replot:
        doc = json.loads(args.replot.read_text())
        table(doc["results"])
        plot(doc["results"], args.out / "constrained_link.png")
        return
    problems = [SMOKE] if args.smoke else [PROBLEMS[p] for p in (args.problem or DEFAULT_PROBLEMS)]
    if args.smoke:
        args.workers = 2
    reason = namespaces_available()
    if reason:
        print(f"network namespaces unavailable ({reason}): running on loopback, no bandwidth limit")
    results: list[dict] = []
    differ: list[str] = []  # runs whose final iterate is not the simulation's: the timings would be of another run
    with logs_dir(args.logs) as logs:
        for p in problems:
            p = resolve_data(p, args.data_dir)
            for m in p.methods:
                if args.methods and m.label not in args.methods:
                    continue
                t0 = time.perf_counter()
                need, curve, tol = simulate_to_target(p, m, args.workers, args.max_rounds)
                reached = curve[-1] < tol
                print(f"  {p.name} {m.label}: {need} rounds to {tol:.3g} (simulated in "
                      f"{time.perf_counter() - t0:.0f} s){'' if reached else ' - not reached: no service run'}",
                      flush=True)
                if not reached:
                    continue
                for rate in (args.rates or p.rates) if not reason else ["loopback"]:
                    link = None if reason else Link(rate, args.delay)
                    service_rounds = need if p.cap is None or m.method != "gd" else min(need, p.cap)
                    cfg = run_config(p, m, args.workers, service_rounds)
                    try:
                        r = run_once(link, cfg, logs / f"{p.name}-{m.label}-{rate}.jsonl")
                    finally:
                        if link:
                            link.close()
                    if service_rounds < need:
                        same = r["grad_norm_sq"] == simulate_to_target(
                            dataclasses.replace(p, tol=0.0, reduction=None), m, args.workers, service_rounds)[1][-1]
                        r = extrapolate(r, need)
                    else:
                        same = r["grad_norm_sq"] == curve[-1]
                    r.update(problem=p.name, data=p.data, method=m.label, link=rate, n=args.workers,
                             shaper=link.shaper if link else "none", settings=dataclasses.asdict(m), lam=p.lam,
                             x0=p.x0, target=tol, reached=reached, same_as_simulation=same,
                             grad_norm_sq=curve[-1], trace=trace(r, curve))
                    if not same:
                        differ.append(f"{p.name} {m.label} {rate}: the service's final |grad f|^2 is not the "
                                      f"simulation's")
                    del r["elapsed"], r["cum_bytes"]
                    results.append(r)
                    print(f"    {rate}: {r['wall_s']:.1f} s, {r['bytes'] / 1e6:.3g} MB, Update {r['update_bytes']:.0f} B,"
                          f" RoundResult {r['result_bytes']:.0f} B{' (extrapolated)' if r.get('extrapolated') else ''}",
                          flush=True)
    if results and results[0]["shaper"] != "none":
        print(f"link: {results[0]['shaper']}")
    if args.update and args.json is not None and args.json.exists():  # the other problems' results, kept
        ran = {r["problem"] for r in results}
        results = [r for r in json.loads(args.json.read_text())["results"] if r["problem"] not in ran] + results
    table(results)
    plot(results, args.out / "constrained_link.png")
    write_json(args.json, "constrained_link", results, namespaces=reason is None)
    if differ:
        sys.exit("constrained_link: not the simulated run: " + "; ".join(differ))


if __name__ == "__main__":
    main()
