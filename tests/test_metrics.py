"""GET /metrics on a live run: valid for promtool, Prometheus conventions, values equal to /status."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import urllib.request

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ef21.engine.config import RunConfig
from ef21_server.coordinator import MasterOptions

from .helpers import eventually, finish, http_get, running_master, spawn_worker

PROMTOOL = shutil.which("promtool")


def scrape(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def promtool_check(text: str) -> None:
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (.ci/install-promtool.sh installs Debian's prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus; CI installs it)")
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_metrics_of_a_live_run_pass_promtool_and_agree_with_status(tmp_path):
    cfg = RunConfig(workers=2, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=300)
    async with running_master(MasterOptions(cfg)) as master:
        url = f"http://127.0.0.1:{master.http.port}"
        bad = tmp_path / "other.svm"
        bad.write_text("1 1:1 2:1\n-1 2:1\n1 3:2\n")
        (code, _), = await finish([await spawn_worker(master.address, "--data", str(bad))])
        assert code == 1  # refused (FAILED_PRECONDITION: its data differs): counted by code
        procs = [await spawn_worker(master.address, "--delay", "0.005") for _ in range(2)]
        await eventually(lambda: master.coord.round >= 20, what="rounds")
        # Live: the scrape lies between two status reads, and promtool accepts it.
        _, before = await asyncio.to_thread(http_get, url + "/status")
        ctype, text = await asyncio.to_thread(scrape, url)
        _, after = await asyncio.to_thread(http_get, url + "/status")
        assert ctype.startswith("text/plain; version=0.0.4")
        await asyncio.to_thread(promtool_check, text)
        live = samples(text)
        assert before["round"] <= live[("ef21_round", ())] <= after["round"]
        assert live[("ef21_run_state", (("state", "running"),))] == 1
        assert live[("ef21_round_duration_seconds_count", ())] >= 20
        assert all(n.startswith("ef21_") for n, _ in live)

        assert [c for c, _ in await finish(procs)] == [0, 0]
        await asyncio.wait_for(master.wait(), 10)
        _, status = await asyncio.to_thread(http_get, url + "/status")
        _, text = await asyncio.to_thread(scrape, url)
        await asyncio.to_thread(promtool_check, text)
    m = samples(text)
    lat = status["latest"]
    one = lambda name, **labels: m[(name, tuple(sorted(labels.items())))]  # noqa: E731
    assert status["state"] == "done" and one("ef21_run_state", state="done") == 1
    assert one("ef21_run_info", run_id=status["run_id"], method="ef21", compressor="topk", k="2",
               problem="logreg", data="mushrooms") == 1
    T = status["round"]  # the last round's x^T (the run stops after its --rounds)
    assert one("ef21_round") == T == lat["round"] == 300
    assert one("ef21_rounds_completed_total") == status["rounds_completed"] == T + 1
    assert one("ef21_rounds_planned") == status["rounds_planned"]
    by_state = {s: sum(w["state"] == s for w in status["workers"]) for s in ("connected", "joined", "set_up",
                                                                            "running", "finished", "left", "lost",
                                                                            "refused")}
    assert {s: one("ef21_workers", state=s) for s in by_state} == by_state == {**by_state, "finished": 2}
    assert one("ef21_workers_expected") == status["workers_expected"]
    assert one("ef21_wire_bytes_total", direction="up") == lat["wire_bytes_up"] > 0
    assert one("ef21_wire_bytes_total", direction="down") == lat["wire_bytes_down"] > 0
    assert one("ef21_paper_bytes_per_worker_total") == lat["bits_per_worker"] / 8
    assert one("ef21_objective") == lat["f"]
    assert one("ef21_grad_norm_squared") == lat["last_grad_norm_sq"]
    assert one("ef21_estimator_error") == lat["G"]
    assert one("ef21_aggregate_norm_squared") == status["g_norm_sq"]
    assert one("ef21_stepsize") == status["gamma"]
    assert one("ef21_late_messages_total") == status["late_messages"] == 0
    assert one("ef21_refused_messages_total", code="FAILED_PRECONDITION") == 1
    assert status["refused_messages"] == {"FAILED_PRECONDITION": 1}
    assert [one("ef21_rank_rounds_behind", rank=str(r)) for r in range(2)] == [0, 0]
    # One duration per round; they add up to the last round's elapsed time.
    assert one("ef21_round_duration_seconds_count") == T + 1
    assert one("ef21_round_duration_seconds_sum") == pytest.approx(master.coord.latest.elapsed_s, rel=1e-9)
    # Rounds 1 … T: two Top-2 Updates each (round 0's dense g_i⁰ is outside the paper's count).
    assert one("ef21_uplink_entries_per_message_count") == 2 * T
    assert one("ef21_uplink_entries_per_message_sum") == 2 * 2 * T
    assert one("ef21_uplink_entries_per_message_bucket", le="1.0") == 0
    assert one("ef21_uplink_entries_per_message_bucket", le="4.0") == 2 * T


async def test_stragglers_show_as_late_messages_and_rounds_behind():
    cfg = RunConfig(workers=3, method="ef21", k=2, stepsize_mult=64, rounds=60)
    opts = MasterOptions(cfg, round_timeout=0.05, min_workers=2)
    async with running_master(opts) as master:
        url = f"http://127.0.0.1:{master.http.port}"
        procs = [await spawn_worker(master.address, "--rank", "0"), await spawn_worker(master.address, "--rank", "1"),
                 await spawn_worker(master.address, "--rank", "2", "--delay", "0.2")]
        await eventually(lambda: master.coord.late_messages > 0 and master.coord.missed_streak.get(2, 0) > 0,
                         what="a late message")
        _, status = await asyncio.to_thread(http_get, url + "/status")
        _, text = await asyncio.to_thread(scrape, url)
        await finish(procs)
    m = samples(text)
    # Scrape and status a few milliseconds apart: the straggler's figures only grow in between.
    assert 0 < status["late_messages"] <= m[("ef21_late_messages_total", ())]
    assert int(status["stale_ranks"]["2"]) >= 1 and m[("ef21_rank_rounds_behind", (("rank", "2"),))] >= 1
    assert m[("ef21_rank_rounds_behind", (("rank", "0"),))] == 0


async def test_each_master_has_its_own_registry():
    cfg = RunConfig(workers=2, rounds=5)
    async with running_master(MasterOptions(cfg)) as a, running_master(MasterOptions(cfg)) as b:
        ta = (await asyncio.to_thread(scrape, f"http://127.0.0.1:{a.http.port}"))[1]
        tb = (await asyncio.to_thread(scrape, f"http://127.0.0.1:{b.http.port}"))[1]
    assert a.coord.run_id in ta and b.coord.run_id not in ta
    assert b.coord.run_id in tb and a.coord.run_id not in tb
    assert "ef21_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
