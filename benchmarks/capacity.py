"""How many workers one master holds: join time, round time, the master's CPU and memory, bytes a round, for
n = 16 … 4096 fake workers that speak the real protocol (``loadgen.py``: many per process, one connection each).

Each run starts ``ef21 master``, then the load generator's processes (``WORKERS_PER_PROCESS`` fake workers each),
and measures the master process from /proc:

* join s — from the generators' start to the last worker's Start (every worker set up and admitted);
* round ms — the median interval between the closes of consecutive rounds (the master's log), steady state;
* master CPU ms a round — user + system CPU of the master process (all its threads) over the steady rounds,
  divided by the rounds; per message — that over the n messages it received a round;
* peak RSS — the master's VmHWM; up/down KB a round — the log's wire_bytes_up/down over the steady rounds;
* result — ``completes``, or how it failed (the master's exit status and last error line, the workers' errors).

Cases: ``quad`` (separable quadratic, d = 10³, k = 10: Setup carries a diagonal), ``logreg`` (logistic regression
on dense synthetic data, d = 10³, k = 10: Setup's curvature is the shard's d×d Gram), ``wide`` (quadratic,
d = 10⁵, k = 10³, EF21 without EF21-BC: the downlink is the union of n supports) and ``wide-bc`` (the same with
``--downlink-k 1000``). The table prints the figures of a baseline JSON (the code before issue 24, measured with
this script and ``--code``) beside this run's. The machine's load averages before and after each run are in the
JSON: the machine is shared, and timings under load mean little.

    git worktree add /tmp/ef21-main main   # or `git archive main | tar -x -C /tmp/ef21-main`
    python benchmarks/capacity.py --case quad --n 16 64 256 1024 --code /tmp/ef21-main \
        --json benchmarks/results/capacity_baseline.json
    python benchmarks/capacity.py --case quad --n 16 64 256 1024 --json benchmarks/results/capacity.json
    python benchmarks/capacity.py --smoke
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
WORKERS_PER_PROCESS = 512

CASES: dict[str, dict] = {
    "quad": {"flags": ["--problem", "quadratic", "--dim", "1000", "--k", "10"], "k": 10, "d": 1000},
    "logreg": {"flags": ["--problem", "logreg", "--data", "synthetic:{rows}:1000:0", "--k", "10"], "k": 10,
               "d": 1000},
    "wide": {"flags": ["--problem", "quadratic", "--dim", "100000", "--k", "1000"], "k": 1000, "d": 100_000},
    "wide-bc": {"flags": ["--problem", "quadratic", "--dim", "100000", "--k", "1000", "--downlink-k", "1000"],
                "k": 1000, "d": 100_000},
}


def load() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (it is shared: timings mean little under a high load)."""
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


@dataclass
class Sample:
    t: float
    cpu_s: float
    rss_kib: int
    hwm_kib: int
    round: int


@dataclass
class Monitor:
    """Samples a process's CPU, memory and the round its log has reached, until it exits."""

    pid: int
    log: Path
    rss_cap_kib: int
    interval: float = 0.05
    samples: list[Sample] = field(default_factory=list)
    capped: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _round(self) -> int:
        try:
            with open(self.log, "rb") as fh:
                fh.seek(max(0, self.log.stat().st_size - 8000))
                lines = fh.read().splitlines()
        except OSError:
            return -1
        for line in reversed(lines):
            try:
                return int(json.loads(line)["round"])
            except (ValueError, KeyError):
                continue
        return -1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            if stat[0] == "Z":
                return
            kib = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
            s = Sample(time.time(), (int(stat[11]) + int(stat[12])) / TICK, kib.get("VmRSS", 0), kib.get("VmHWM", 0),
                       self._round())
            self.samples.append(s)
            if s.rss_kib > self.rss_cap_kib and not self.capped:
                self.capped = True
                os.kill(self.pid, signal.SIGKILL)
            self._stop.wait(self.interval)


def spawn(cmd: list[str], env: dict, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    # Not from the checkout: `python -m` would put it first on sys.path, ahead of --code's tree.
    return subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env, stdin=subprocess.DEVNULL, **kw)


def read_address(proc: subprocess.Popen, what: str, timeout: float = 120.0) -> str:
    """The HOST:PORT a freshly started master or aggregator prints on its first line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{what} exited before listening (status {proc.wait()})")
        m = re.search(r"listening on (\S+?:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore
            return m.group(1)
    raise SystemExit(f"{what} did not say where it listens within {timeout:g} s")


def steady_window(rounds: int) -> tuple[int, int]:
    """Rounds measured: past round 0's dense messages and the first rounds' warm-up, before the last (an
    evaluation round: every worker sends a dense gradient)."""
    return max(2, rounds // 5), rounds - 1


def code_path(src: Path, tmp: Path) -> str:
    """A PYTHONPATH that imports ef21, ef21_wire, ef21_server and ef21_worker from the source tree ``src`` (the
    last two live in server/ and worker/ there, installed under those names): links in a scratch folder."""
    shim = tmp / "code"
    shim.mkdir()
    for name, sub in (("ef21", "ef21"), ("ef21_wire", "ef21_wire"), ("ef21_server", "server"),
                      ("ef21_worker", "worker")):
        if not (src / sub / "__init__.py").exists():
            raise SystemExit(f"--code {src}: no {sub}/__init__.py there")
        (shim / name).symlink_to((src / sub).resolve())
    return str(shim)


def profile_summary(raw: Path, top: int = 12) -> dict:
    """py-spy's collapsed stacks of the master → the functions most often on top of the stack (self time) and the
    share of samples inside each of our packages (inclusive)."""
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        leaf = re.sub(r" \((.*/)?", " (", frames[-1])
        self_time[leaf] = self_time.get(leaf, 0) + c
        for pkg in {m.group(1) for f in frames if (m := re.search(r"/(ef21_server|ef21_wire|ef21|server|"
                                                                   r"ef21_worker)/", f))}:
            inclusive[pkg] = inclusive.get(pkg, 0) + c
    top_self = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    return {"samples": total, "self": [[f, c / max(total, 1)] for f, c in top_self],
            "inclusive": {k: v / max(total, 1) for k, v in sorted(inclusive.items())}}


def run_one(case: str, n: int, rounds: int, aggregators: int, tmp: Path, env: dict, rss_cap_gib: float,
            join_timeout: float, run_timeout: float, python: str, py_spy: Path | None = None,
            gen_args: tuple[str, ...] = ()) -> dict:
    spec = CASES[case]
    flags = [f.format(rows=2 * n) for f in spec["flags"]]
    log = tmp / f"{case}-{n}-{aggregators}.jsonl"
    cmd = [python, "-m", "ef21", "master", "--workers", str(n), "--method", "ef21", *flags, "--rounds", str(rounds),
           "--tol", "0", "--eval-every", str(10**9), "--port", "0", "--status-port", "-1", "--join-timeout",
           str(join_timeout), "--log", str(log), "--x0", "zeros"]
    if aggregators:
        cmd += ["--aggregators", str(aggregators)]
    out: dict = {"case": case, "n": n, "aggregators": aggregators, "rounds": rounds, "d": spec["d"], "k": spec["k"],
                 "load_before": load(), "gen_args": list(gen_args)}
    errlog = tmp / f"master-{case}-{n}-{aggregators}.err"
    master = spawn(cmd, env, stdout=subprocess.PIPE, stderr=open(errlog, "w"), text=True)
    mon = Monitor(master.pid, log, int(rss_cap_gib * 2**20))
    procs: list[subprocess.Popen] = []
    try:
        address = read_address(master, "ef21 master")
        mon.start()
        if py_spy is not None:  # sampled from outside (the master runs as is), all its threads, GIL or not
            spy = spawn(["py-spy", "record", "--pid", str(master.pid), "--rate", "200", "--format", "raw",
                         "--nonblocking", "--output", str(tmp / "spy.txt")], env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        targets = address
        if aggregators:
            aggs = []
            for j in range(aggregators):
                p = spawn([python, "-m", "ef21", "aggregator", "--master", address, "--port", "0", "--block", str(j)],
                          env, stdout=subprocess.PIPE, stderr=open(tmp / f"agg-{j}.err", "w"), text=True)
                procs.append(p)
                aggs.append(read_address(p, f"ef21 aggregator {j}"))
            targets = ",".join(aggs)
        per = WORKERS_PER_PROCESS
        t0 = time.time()
        gens = []
        for g in range(math.ceil(n / per)):
            lo, hi = g * per, min(n, (g + 1) * per)
            gcmd = [python, str(ROOT / "benchmarks" / "loadgen.py"), "--target", targets, "--ranks", f"{lo}:{hi}",
                    "--k", str(spec["k"]), "--out", str(tmp / f"gen-{g}.jsonl")]
            if aggregators:
                gcmd += ["--block-size", str(math.ceil(n / aggregators))]
            gcmd += gen_args
            gens.append(spawn(gcmd, env, stderr=open(tmp / f"gen-{g}.err", "w")))
        procs += gens
        try:
            code = master.wait(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            master.kill()
            code = master.wait()
            out["timed_out"] = True
        for p in gens:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p in [master, *procs]:
            if p.poll() is None:
                p.kill()
                p.wait()
        if mon.samples or getattr(mon, "_thread", None):
            mon.stop()
    if py_spy is not None:
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
        if (tmp / "spy.txt").exists():
            py_spy.mkdir(parents=True, exist_ok=True)
            out["profile"] = profile_summary(tmp / "spy.txt")
            (tmp / "spy.txt").replace(py_spy / f"{case}-{n}.txt")
    out["load_after"] = load()
    out["master_exit"] = code
    outcomes = []
    for path in sorted(tmp.glob("gen-*.jsonl")):
        outcomes += [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
    started = [o["started"] for o in outcomes if o["started"]]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o["error"]:
            key = re.sub(r"\d+", "N", o["error"])[:160]
            errors[key] = errors.get(key, 0) + 1
    retries: dict[str, int] = {}
    examples: dict[str, str] = {}  # one whole reason per kind: gRPC's debug_error_string says where it ended
    for o in outcomes:
        for why in o.get("retries", []):
            key_ = re.sub(r"\d+", "N", why.split("debug_error_string")[0])[:160]
            retries[key_] = retries.get(key_, 0) + 1
            examples.setdefault(key_, why[:600])
    out["workers_started"] = len(started)
    out["worker_errors"] = errors
    out["stream_retries"] = retries  # streams that broke before the Welcome and were opened again
    out["stream_retry_examples"] = examples
    out["join_s"] = (max(started) - t0) if len(started) == n else None
    out["peak_rss_mib"] = max((s.hwm_kib for s in mon.samples), default=0) / 1024
    out["rss_capped"] = mon.capped
    err_lines = [ln for ln in errlog.read_text(errors="replace").splitlines() if ln.strip()]
    out["master_last_error"] = next((ln for ln in reversed(err_lines) if "error" in ln.lower()), "")[:300]
    warnings: dict[str, int] = {}
    for ln in err_lines:
        if " WARNING " in ln or " ERROR " in ln:
            k_ = re.sub(r"\d+", "N", ln.split(" ", 2)[-1])[:160]
            warnings[k_] = warnings.get(k_, 0) + 1
    out["master_warnings"] = warnings
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    a, b = steady_window(rounds)
    by_round = {r["round"]: r for r in recs}
    if code == 0 and a in by_round and b in by_round:
        window = [by_round[t]["elapsed_s"] for t in range(a, b + 1)]
        out["round_ms"] = 1e3 * float(np.median(np.diff(window)))
        out["up_kb"] = (by_round[b]["wire_bytes_up"] - by_round[a]["wire_bytes_up"]) / (b - a) / 1e3
        out["down_kb"] = (by_round[b]["wire_bytes_down"] - by_round[a]["wire_bytes_down"]) / (b - a) / 1e3
        # CPU between the first sample that saw round a closed and the last that saw round b not yet closed.
        sa = next((s for s in mon.samples if s.round >= a), None)
        sb = next((s for s in reversed(mon.samples) if 0 <= s.round < b), None)
        if sa is not None and sb is not None and sb.round > sa.round:
            per_round = (sb.cpu_s - sa.cpu_s) / (sb.round - sa.round)
            out["master_cpu_ms"] = 1e3 * per_round
            out["master_cpu_per_msg_ms"] = 1e3 * per_round / (aggregators or n)
        start = next((s for s in mon.samples if s.round >= 0), None)
        out["join_cpu_s"] = None if start is None else start.cpu_s
        out["result"] = "completes"
    elif mon.capped:
        out["result"] = f"killed by the benchmark at {rss_cap_gib:g} GiB of master RSS"
    elif out.get("timed_out"):
        out["result"] = f"did not finish within {run_timeout:g} s"
    else:
        out["result"] = f"master exited {code}: {out['master_last_error']}"[:300]
    return out


def fmt(v: object, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def key(r: dict) -> tuple:
    return (r["case"], r["n"], r["aggregators"])


def table(results: list[dict], baseline: list[dict]) -> None:
    base = {key(r): r for r in baseline}
    rows = []
    for r in results:
        b = base.get(key(r), {})
        rows.append([r["case"], r["n"], r["aggregators"] or "-",
                     fmt(b.get("join_s")), fmt(r.get("join_s")),
                     fmt(b.get("round_ms")), fmt(r.get("round_ms")),
                     fmt(b.get("master_cpu_ms")), fmt(r.get("master_cpu_ms")),
                     fmt(b.get("master_cpu_per_msg_ms")), fmt(r.get("master_cpu_per_msg_ms")),
                     fmt(b.get("peak_rss_mib"), ".0f"), fmt(r.get("peak_rss_mib"), ".0f"),
                     fmt(r.get("up_kb")), fmt(b.get("down_kb")), fmt(r.get("down_kb")),
                     "ok" if b.get("result") == "completes" else ("-" if not b else "FAIL"),
                     "ok" if r.get("result") == "completes" else "FAIL"])
    print_table(["case", "n", "F", "join s (before)", "join s", "round ms (before)", "round ms",
                 "CPU ms/round (before)", "CPU ms/round", "CPU ms/msg (before)", "CPU ms/msg",
                 "RSS MiB (before)", "RSS MiB", "up KB/round", "down KB (before)", "down KB", "before", "now"], rows)
    for r in results:
        if r.get("result") != "completes":
            print(f"  {r['case']} n={r['n']} F={r['aggregators']}: {r['result']}; workers' errors: "
                  f"{r.get('worker_errors')}")
    for b in baseline:
        if b.get("result") != "completes" and key(b) in {key(r) for r in results}:
            print(f"  before, {b['case']} n={b['n']}: {b['result']}")


def figure(results: list[dict], baseline: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((ax1, "quad", "master_cpu_ms", "master CPU ms a round"),
              (ax2, "logreg", "peak_rss_mib", "master peak RSS MiB"))
    ax1.set_title("quadratic, d = 10³", fontsize=10)
    ax2.set_title("logistic, d = 10³ (set-up sums the shards' Grams)", fontsize=10)
    for label, rs, style in (("before (main)", baseline, "o--"), ("now", results, "s-")):
        for agg in sorted({r["aggregators"] for r in rs}):
            name = label + ("" if not agg else f", {agg} aggregators")
            for ax, case, field_, _ in panels:
                pts = sorted((r["n"], r.get(field_)) for r in rs if r["case"] == case and r["aggregators"] == agg
                             and r.get("result") == "completes" and r.get(field_) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    for ax, _, _, ylabel in panels:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("one master, n fake workers speaking the real protocol (EF21, Top-10)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--case", choices=sorted(CASES), nargs="+", default=["quad"])
    ap.add_argument("--n", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--aggregators", type=int, nargs="+", default=[0], metavar="F",
                    help="run each n flat (0) and through F aggregator processes (docs/aggregators.md)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="rounds of each run (default: 30 to 300, more for small n, so each run lasts seconds)")
    ap.add_argument("--join-timeout", type=float, default=300.0)
    ap.add_argument("--run-timeout", type=float, default=1800.0)
    ap.add_argument("--rss-cap-gib", type=float, default=6.0,
                    help="kill the master above this RSS (the machine is shared); the run is reported as killed")
    ap.add_argument("--baseline", type=Path, default=ROOT / "benchmarks" / "results" / "capacity_baseline.json")
    ap.add_argument("--code", type=Path, default=None,
                    help="run the master and workers from this source tree (e.g. an export of main), for a baseline")
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--merge", action="store_true", help="add to --json's results instead of replacing them")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="sample the master with py-spy (on PATH) and keep its collapsed stacks in DIR; the JSON "
                         "gets the top functions")
    ap.add_argument("--gen-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to every loadgen.py (e.g. --gen-arg=--retries=20)")
    ap.add_argument("--replot", action="store_true",
                    help="run nothing: print the table and draw --figure from --json's results and the baseline")
    args = ap.parse_args()
    if args.replot:
        if args.json is None or not args.json.exists():
            raise SystemExit("--replot needs --json PATH of an earlier run")
        results = json.loads(args.json.read_text())["results"]
        baseline = json.loads(args.baseline.read_text())["results"] if args.baseline.exists() else []
        table(results, baseline)
        if args.figure is not None:
            figure(results, baseline, args.figure)
        return
    env = dict(os.environ)
    if args.smoke:
        args.case, args.n, args.rounds = ["quad", "logreg"], [4], 6
    baseline = json.loads(args.baseline.read_text())["results"] if args.baseline.exists() and not args.smoke else []
    results = []
    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        if args.code is not None:
            env["PYTHONPATH"] = code_path(args.code, Path(tmp))
        for case in args.case:
            for agg in args.aggregators:
                for n in args.n:
                    print(f"{case} n={n} aggregators={agg} (load {load()}) ...", flush=True)
                    rounds = args.rounds or max(30, min(300, 20000 // n))
                    r = run_one(case, n, rounds, agg, Path(tmp), env, args.rss_cap_gib, args.join_timeout,
                                args.run_timeout, sys.executable, args.py_spy, tuple(args.gen_arg))
                    print(f"  {r['result']}; join {fmt(r.get('join_s'))} s, round {fmt(r.get('round_ms'))} ms, "
                          f"master CPU {fmt(r.get('master_cpu_ms'))} ms a round, RSS {fmt(r['peak_rss_mib'], '.0f')} "
                          f"MiB", flush=True)
                    results.append(r)
    table(results, baseline)
    if args.json is not None and args.merge and args.json.exists():
        old = [r for r in json.loads(args.json.read_text())["results"] if key(r) not in {key(x) for x in results}]
        results = old + results
    write_json(args.json, "capacity", results, cpus=os.cpu_count(), code=str(args.code or "this checkout"))
    if args.figure is not None:
        figure(results, baseline, args.figure)


if __name__ == "__main__":
    main()
