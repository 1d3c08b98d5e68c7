"""The EF21 family since 2021 (docs/methods-family.md): CLAG/LAG, EControl, DIANA, MARINA and EF21-P.

Each rule against its plain dense twin in ``tests/oracle.py`` (iterates to 1e-12, the log's figures and bits
exactly), each through the real service equal to the simulator bit for bit, CLAG's skips on the wire, and the bad
input each one refuses in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.errors import UserError
from ef21.methods.stepsize import family_stepsize

from . import oracle
from .helpers import one_error_line
from .test_config_files import free_port
from .test_oracle import assert_matches_oracle, make_case

PY = sys.executable
SEED = 3


def marina_coins(p: float, rounds: int) -> dict[int, bool]:
    """MARINA's coin of round t, the same for every worker: ``default_rng([seed, t, 6]).random() < p``."""
    return {t: bool(np.random.default_rng([SEED, t, 6]).random() < p) for t in range(1, rounds + 1)}


@dataclass(frozen=True)
class Rule:
    flags: dict[str, Any]
    uplink: Any  # (case) -> oracle uplink
    down: int | None = None  # EF21-P's Top-K on the downlink
    extra: dict[str, Any] = field(default_factory=dict)


def _comp(name: str, k: int | None) -> Any:
    return {"topk": lambda: oracle.TopK(k), "randk": lambda: oracle.RandK(k), "urandk": lambda: oracle.URandK(k),
            "natural": lambda: oracle.Natural(), "identity": lambda: oracle.Identity()}[name]()


RULES = {
    "clag": Rule(dict(method="clag", compressor="topk", k=2, clag_zeta=1.0),
                 lambda c, f: oracle.ClagUplink(_comp("topk", 2), 1.0, seed=SEED)),
    "clag-randk": Rule(dict(method="clag", compressor="randk", k=3, clag_zeta=50.0),
                       lambda c, f: oracle.ClagUplink(_comp("randk", 3), 50.0, seed=SEED)),
    # ζ = 3, not 1 or 4: on the quadratic, ∇f_i is linear, and a worker that skips moves with a constant g, so the
    # trigger's two sides come in exact ratios 1 and 4, where the last bit of either would decide.
    "lag": Rule(dict(method="lag", clag_zeta=3.0), lambda c, f: oracle.ClagUplink(_comp("identity", None), 3.0)),
    "econtrol": Rule(dict(method="econtrol", compressor="topk", k=2, econtrol_eta=0.3),
                     lambda c, f: oracle.EControlUplink(_comp("topk", 2), 0.3, seed=SEED)),
    "diana": Rule(dict(method="diana", compressor="urandk", k=3),
                  lambda c, f: oracle.DianaUplink(_comp("urandk", 3), 3 / c.ref.d, seed=SEED)),
    "diana-compressed": Rule(dict(method="diana", compressor="urandk", k=3, init="compressed", diana_alpha=0.02),
                             lambda c, f: oracle.DianaUplink(_comp("urandk", 3), 0.02, full_start=False, seed=SEED)),
    "diana-natural": Rule(dict(method="diana", compressor="natural", k=None),
                          lambda c, f: oracle.DianaUplink(_comp("natural", None), 8 / 9, seed=SEED)),
    "marina": Rule(dict(method="marina", compressor="urandk", k=3, marina_p=0.3),
                   lambda c, f: oracle.MarinaUplink(_comp("urandk", 3), marina_coins(0.3, c.rounds), seed=SEED)),
    "p-diana": Rule(dict(method="diana", compressor="urandk", k=3, downlink_method="ef21-p", downlink_k=3),
                    lambda c, f: oracle.DianaUplink(_comp("urandk", 3), 3 / c.ref.d, seed=SEED), down=3),
    "p-marina": Rule(dict(method="marina", compressor="urandk", k=3, marina_p=0.3, downlink_method="ef21-p",
                          downlink_k=4),
                     lambda c, f: oracle.MarinaUplink(_comp("urandk", 3), marina_coins(0.3, c.rounds), seed=SEED),
                     down=4),
    # Rand-k up: mushrooms has columns whose gradient entries agree to the last bits, and under EF21-P a Top-k
    # uplink meets them as near-ties that the two implementations' roundings break differently.
    "p-ef21": Rule(dict(method="ef21", compressor="randk", k=3, downlink_method="ef21-p", downlink_k=3),
                   lambda c, f: oracle.Ef21Uplink(_comp("randk", 3), seed=SEED), down=3),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("case", ["mushrooms", "quadratic"])
def test_family_equals_the_oracle(case, rule, tmp_path):
    if rule == "diana-natural" and case == "quadratic":
        # Natural compression rounds at random between powers of two: once ∇f_i − h_i is down to 1e-5 of ∇f_i, the
        # two implementations' last-bit differences move a draw across its threshold now and then (seen at round
        # 37), and the runs part. Compared on mushrooms.
        pytest.skip("natural compression is compared on mushrooms")
    c = make_case(case)
    r = RULES[rule]
    flags = dict(r.flags)
    if "urandk" in flags.values() and case == "quadratic":
        flags["k"] = 200  # d = 2000: ω = 9, as mushrooms' k = 3 of 112 is ω ≈ 36 (the quadratic diverges there)
    np.save(tmp_path / "x0.npy", c.x0)
    cfg = RunConfig(**(c.cfg.to_dict() | dict(stepsize=c.gamma, rounds=c.rounds, x0=str(tmp_path / "x0.npy"),
                                              seed=SEED) | flags))
    sim = simulate(cfg, c.problem, keep_iterates=True)
    assert sim.stop_reason == "rounds", sim.message
    uplink = r.uplink(c, flags)
    if flags.get("k") != r.flags.get("k"):
        uplink.comp = oracle.URandK(flags["k"])
        if hasattr(uplink, "alpha") and "diana_alpha" not in flags:
            uplink.alpha = flags["k"] / c.ref.d
    ref = oracle.family(c.ref, c.x0, c.gamma, c.rounds, uplink, down=None if r.down is None else oracle.TopK(r.down),
                        seed=SEED)
    assert_matches_oracle(sim, ref)
    if rule.startswith(("clag", "lag")):  # both branches of the trigger are compared
        assert uplink.skipped > 0 and uplink.fired > 0, (uplink.skipped, uplink.fired)
    if "marina" in rule:
        coins = marina_coins(0.3, c.rounds)
        assert any(coins.values()) and not all(coins.values())


def test_clag_with_zeta_zero_is_ef21(tmp_path):
    """ζ = 0 fires whenever g_i ≠ ∇f_i: the iterates are EF21's (the bits differ only by the selector)."""
    base = dict(workers=4, k=2, stepsize_mult=64, rounds=150, x0="normal:0")
    a = simulate(RunConfig(method="clag", clag_zeta=0.0, **base), keep_iterates=True)
    b = simulate(RunConfig(method="ef21", **base), keep_iterates=True)
    np.testing.assert_array_equal(np.array(a.xs), np.array(b.xs))
    assert a.records[-1].bits_per_worker == b.records[-1].bits_per_worker


# -- through the service: equal to the simulator, bit for bit ------------------------------------------------------

SERVICE = {
    "clag": ["--method", "clag", "--clag-zeta", "2"],
    "econtrol": ["--method", "econtrol", "--econtrol-eta", "0.3"],
    "marina-natural": ["--method", "marina", "--compressor", "natural", "--stepsize-mult", "8"],
    "p-diana-no-rows": ["--method", "diana", "--compressor", "urandk", "--k", "8", "--stepsize-mult", "8",
                        "--downlink-method", "ef21-p", "--downlink-k", "8"],
    "lag": ["--method", "lag", "--clag-zeta", "4", "--stepsize-mult", "1"],
    "p-marina": ["--method", "marina", "--compressor", "urandk", "--k", "8", "--stepsize-mult", "8",
                 "--downlink-method", "ef21-p", "--downlink-k", "8", "--downlink-compressor", "randk"],
}
FAST = ("clag", "marina-natural", "p-diana-no-rows")
RUN_FLAGS = {"p-diana-no-rows": ["--master-rows", "none"]}  # EF21-P keeps nothing in the rows: none are needed


def config_of(args: list[str]) -> RunConfig:
    from ef21.__main__ import build_parser
    from ef21.cli.args import config_from_args

    return config_from_args(build_parser().parse_args(["simulate", *args]))


@pytest.mark.parametrize("name", [v if v in FAST else pytest.param(v, marks=pytest.mark.slow) for v in SERVICE])
def test_service_equals_simulator(tmp_path, name):
    args = ["--workers", "3", "--k", "2", "--stepsize-mult", "16", "--rounds", "60", "--x0", "normal:0",
            *SERVICE[name]]
    log, its = tmp_path / "l.jsonl", tmp_path / "xs.npy"
    r = subprocess.run([PY, "-m", "ef21", "run", *args, "--log", str(log), "--save-iterates", str(its), "-q",
                        "--status-port", "-1", "--checksum-every", "7", *RUN_FLAGS.get(name, [])],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    sim = simulate(config_of(args), keep_iterates=True)
    np.testing.assert_array_equal(np.load(its), np.array(sim.xs))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for row, rec in zip(rows, sim.records, strict=True):
        assert (row["f"], row["grad_norm_sq"], row["G"], row["g_norm_sq"]) == (rec.f, rec.grad_norm_sq, rec.G,
                                                                               rec.g_norm_sq)
        assert (row["bits_per_worker"], row["payload_bits_per_worker"], row["bits_down_per_worker"]) == \
            (rec.bits_per_worker, rec.payload_bits_per_worker, rec.bits_down_per_worker)
    if name == "clag":
        check_skips_on_the_wire(rows, n=3)


def skip_wire_bytes(round_: int, d: int) -> int:
    """A skip's Update as the master measures it: the serialized message (the round, an empty vector of dimension
    d: 8 bytes for d = 112 and a round below 128) plus gRPC's 5-byte frame."""
    from ef21.compression.codec import encode
    from ef21.compression.sparse import SparseVector
    from ef21_wire.protocol import GRPC_FRAME_BYTES
    from ef21_wire.serde import update_to_bytes

    return len(update_to_bytes(round_, encode(SparseVector.zeros(d)), False)) + GRPC_FRAME_BYTES


def check_skips_on_the_wire(rows: list[dict], n: int) -> None:
    """Rounds in which every worker skipped cost 0 paper bits, n selector bits of payload and n skip messages'
    bytes on the wire; the round still closed (the run went on without a --round-timeout)."""
    all_skipped = 0
    for prev, row in zip(rows, rows[1:]):
        if row["bits_per_worker"] == prev["bits_per_worker"]:
            all_skipped += 1
            assert row["payload_bits_per_worker"] - prev["payload_bits_per_worker"] == 1.0  # n bits / n workers
            # The log's row t counts the Updates of round t (those that evaluated x^t).
            assert row["wire_bytes_up"] - prev["wire_bytes_up"] == n * skip_wire_bytes(row["round"], 112) == n * 13
    assert all_skipped > 0


# -- bad input: one line, exit 2 ---------------------------------------------------------------------------------

BAD = [
    (dict(method="diana", compressor="topk", k=2), "diana needs an unbiased compressor"),
    (dict(method="marina", compressor="crandk", k=2), "marina needs an unbiased compressor"),
    (dict(method="clag", compressor="urandk", k=2), "clag needs a contractive compressor"),
    (dict(method="econtrol", compressor="urandk", k=2), "econtrol needs a contractive compressor"),
    (dict(method="clag", clag_zeta=-1.0), "--clag-zeta must be >= 0"),
    (dict(method="econtrol", econtrol_eta=0.0), "--econtrol-eta must lie in (0, 1]"),
    (dict(method="econtrol", econtrol_eta=1.5), "--econtrol-eta must lie in (0, 1]"),
    (dict(method="diana", compressor="urandk", k=8, diana_alpha=0.5), "--diana-alpha must lie in (0, 1/(omega+1)]"),
    (dict(method="marina", compressor="urandk", k=8, marina_p=0.0), "--marina-p must lie in (0, 1]"),
    (dict(method="diana", compressor="urandk", k=8, downlink_method="ef21-p"), "needs --downlink-k K"),
    (dict(method="clag", downlink_method="ef21-p", downlink_k=4), "--downlink-method ef21-p is an option of the ef21, "
                                                                  "diana and marina methods, not clag"),
    (dict(method="diana", compressor="urandk", k=8, downlink_method="ef21-p", downlink_k=4,
          downlink_compressor="urandk"), "not contractive; EF21-P needs one"),
    (dict(method="ef21", downlink_method="ef21-p", downlink_k=4, participation="2"), "not covered by the theory"),
    (dict(method="marina", compressor="urandk", k=8, estimator="sgd", batch_size=4), "--estimator sgd works with"),
    (dict(method="clag", momentum=0.5), "--momentum is an option of the ef21 method, not clag"),
    (dict(method="diana", compressor="urandk", k=8, mu=0.1), "--mu (the PL stepsize"),
    (dict(method="diana", compressor="urandk", k=8, optimizer="adam"), "--optimizer is not an option of diana"),
    (dict(method="marina", compressor="urandk", k=8, downlink_method="ef21-p", downlink_k=4, optimizer="sgd"),
     "--optimizer is not an option of EF21-P"),
]


@pytest.mark.parametrize("flags,match", BAD)
def test_bad_family_flags_are_refused_in_one_line(flags, match):
    """What `simulate`, `run` and `master` check before anything starts: the configuration, then the method
    against the compressor and d."""
    from ef21.engine.plan import resolve_downlink, resolve_method

    with pytest.raises(UserError) as err:
        cfg = RunConfig(**(dict(workers=4, rounds=3) | flags))
        resolve_method(cfg, 112)
        resolve_downlink(cfg, 112)
    assert match in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_ef21p_refuses_a_model_with_buffers():
    """The workers hold w, not x: a model's buffers would need a broadcast of their own."""
    from ef21.engine.plan import make_plan
    from ef21.problems.layout import ModelLayout, TensorSpec

    layout = ModelLayout(params=(TensorSpec("w", (8,), "float32"),), buffers=(TensorSpec("bn.mean", (2,), "float32"),))
    cfg = RunConfig(workers=2, rounds=3, method="diana", compressor="urandk", k=4, downlink_method="ef21-p",
                    downlink_k=4, stepsize=0.1)
    with pytest.raises(UserError, match="does not carry a model's buffers"):
        make_plan(cfg, 8, 1.0, [1.0, 1.0], [None, None], layout=layout)
    make_plan(cfg, 8, 1.0, [1.0, 1.0], [None, None], layout=ModelLayout(params=layout.params))  # without: runs


@pytest.mark.parametrize("command", ["simulate", "run", "master"])
def test_the_commands_refuse_them_with_exit_2(command):
    flags = ["--method", "diana", "--compressor", "topk", "--k", "2", "--workers", "4", "--rounds", "3"]
    if command != "simulate":
        flags += ["--port", "0", "--status-port", "-1"]
    r = subprocess.run([PY, "-m", "ef21", command, *flags], capture_output=True, text=True, timeout=60)
    assert "diana needs an unbiased compressor" in one_error_line(r)


def test_the_family_from_a_config_file(tmp_path):
    """The new flags are config-file keys like every other (the keys come from the parser)."""
    conf = tmp_path / "run.toml"
    conf.write_text('[method]\nmethod = "marina"\ncompressor = "urandk"\nk = 8\nmarina-p = 0.25\n'
                    'downlink-method = "ef21-p"\ndownlink-k = 6\n[simulate]\nworkers = 3\nrounds = 20\n')
    log = tmp_path / "l.jsonl"
    r = subprocess.run([PY, "-m", "ef21", "simulate", "--config", str(conf), "--log", str(log), "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "marina-P / urandk k=8, downlink topk K=6" in r.stdout and "marina_p=0.25" in r.stdout, r.stdout
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["round"] == 20 and last["bits_down_per_worker"] == 19 * 6 * 32  # round 0 is not counted


@pytest.mark.slow
def test_ef21p_diana_resumes_from_its_checkpoint_exactly(tmp_path):
    """A run stopped at 30 rounds and resumed to 60 is the 60-round run bit for bit: the checkpoint keeps EF21-P's
    w and DIANA's h (the replicas' g) and every h_i (the rows), and the workers of the resumed run, handed their
    h_i and w in the Start, carry on exactly."""
    ck, log, out = tmp_path / "ck.npz", tmp_path / "l.jsonl", tmp_path / "x.npy"
    flags = ["--workers", "3", "--method", "diana", "--compressor", "urandk", "--k", "8", "--stepsize-mult", "8",
             "--downlink-method", "ef21-p", "--downlink-k", "8", "--x0", "normal:0"]
    common = [*flags, "-q", "--status-port", "-1", "--checkpoint", str(ck), "--log", str(log), "--out", str(out)]
    for rounds, extra in (("30", []), ("60", ["--resume", str(ck)])):
        r = subprocess.run([PY, "-m", "ef21", "run", *common, "--rounds", rounds, *extra], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    sim = simulate(config_of([*flags, "--rounds", "60"]))
    np.testing.assert_array_equal(np.load(out), sim.x)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(61))
    assert rows[-1]["grad_norm_sq"] == sim.records[-1].grad_norm_sq


def test_family_stepsize_rules_against_their_formulas():
    """Each family rule's stepsize against its formula written out independently here (θ, β from α by hand), and
    EF21-P's rule string: the paper (arXiv 2209.15218v2) bounds only EF21-P + DIANA, so MARINA/EF21 under it say
    "heuristic"."""
    L, Lt, a, n, w = 2.0, 3.0, 0.04, 8, 9.0
    th = 1.0 - (1.0 - a) ** 0.5
    be = (1.0 - a) / th
    want = {
        ("clag", 4.0): 1.0 / (L + Lt * (max(be, 4.0) / th) ** 0.5),
        ("clag", 0.0): 1.0 / (L + Lt * (be / th) ** 0.5),
        ("econtrol", None): 1.0 / (L + Lt * (be / th) ** 0.5),
        ("diana", None): 1.0 / (L + Lt * 10.0 * (12.0 * w / n) ** 0.5),  # α_D = 1/(ω + 1) = 0.1
        ("marina", None): 1.0 / (L + Lt * ((1.0 - 0.1) * w / (0.1 * n)) ** 0.5),
    }
    params = {"clag": lambda z: {"zeta": z}, "econtrol": lambda _: {"eta": a},
              "diana": lambda _: {"diana_alpha": 0.1}, "marina": lambda _: {"marina_p": 0.1}}
    for (method, z), gamma in want.items():
        got = family_stepsize(method, L, Lt, a, n=n, omega=w, params=params[method](z), multiplier=3.0)
        assert got.gamma_base == pytest.approx(gamma, rel=1e-12), method
        assert got.gamma == pytest.approx(3.0 * gamma, rel=1e-12), method
    diana = family_stepsize("diana", L, Lt, a, n=n, omega=w, params={"diana_alpha": 0.1}, primal=True)
    assert "Thm 5.1" in diana.rule and "heuristic" not in diana.rule
    marina = family_stepsize("marina", L, Lt, a, n=n, omega=w, params={"marina_p": 0.1}, primal=True)
    assert "heuristic" in marina.rule and "Thm 5.1" not in marina.rule


def test_master_and_workers_from_config_files_equal_the_simulator(tmp_path):
    """The compose path without docker: ``ef21 master --config`` picks the family method (DIANA with EF21-P on the
    downlink) from a TOML file, three ``ef21 worker --config`` processes know only the master's address (as the
    compose file's workers), and the master's iterate and log are the simulator's bit for bit."""
    port = free_port()
    method = ('method = "diana"\ncompressor = "urandk"\nk = 8\ndownlink-method = "ef21-p"\ndownlink-k = 8\n'
              'workers = 3\nrounds = 40\nstepsize-mult = 8\nx0 = "normal:0"\n')
    (tmp_path / "m.toml").write_text(method + f'[master]\nhost = "127.0.0.1"\nport = {port}\nstatus-port = -1\n'
                                     'round-timeout = 30\njoin-timeout = 60\n')
    (tmp_path / "w.toml").write_text(f'[worker]\nmaster = "127.0.0.1:{port}"\nconnect-timeout = 60\n')
    log, out = tmp_path / "l.jsonl", tmp_path / "x.npy"
    master = subprocess.Popen([PY, "-m", "ef21", "master", "--config", "m.toml", "--log", str(log), "--out", str(out),
                               "-q"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([PY, "-m", "ef21", "worker", "--config", "w.toml"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        _, err = master.communicate(timeout=120)
        assert master.returncode == 0, err
        for w in workers:
            _, werr = w.communicate(timeout=30)
            assert w.returncode == 0, werr
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
    sim = simulate(config_of(["--method", "diana", "--compressor", "urandk", "--k", "8", "--downlink-method", "ef21-p",
                              "--downlink-k", "8", "--workers", "3", "--rounds", "40", "--stepsize-mult", "8",
                              "--x0", "normal:0"]))
    np.testing.assert_array_equal(np.load(out), sim.x)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(41))
    assert [(r["grad_norm_sq"], r["bits_down_per_worker"]) for r in rows] == \
        [(rec.grad_norm_sq, rec.bits_down_per_worker) for rec in sim.records]
