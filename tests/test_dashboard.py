"""The dashboard in headless Chromium: a real ``ef21 run`` (and a TLS master with a status token), the page's numbers
against /status, the curve growing as rounds go, and a screenshot whose chart is drawn."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ef21.engine.config import RunConfig
from ef21_server.coordinator import MasterOptions
from ef21_server.master import ListenOptions, Master
from ef21_server.security import ServerSecurity

from .cdp import CHROMIUM, Browser
from .helpers import finish, http_get
from .test_security import pki  # noqa: F401  (the certificates fixture)

PY = sys.executable
TOKEN = "dashboard-run-token"
GRAD_RGB = (0x1F, 0x5F, 0xBF)  # the ‖∇f‖² line (server/static/dashboard.js)

# Debian's chromium is installed by .ci/install-chromium.sh: in CI its absence is a failure, not a skip.
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="chromium is not installed (apt-get install chromium; CI installs it)")

SHOWN = """(() => {
  const v = (id) => document.getElementById(id).dataset.value;
  return {round: v("v-round"), f: v("v-f"), grad: v("v-grad"), G: v("v-G"), gnorm: v("v-gnorm"),
    bits: v("v-bits"), up: v("v-up"), down: v("v-down"), eval: v("v-eval"), connected: v("v-workers"),
    labels: [...document.querySelectorAll("#facts label, #workers th")].map((el) => el.textContent),
    state: document.getElementById("state").dataset.value,
    points: document.getElementById("chart-grad").dataset.points,
    rows: [...document.querySelectorAll("#workers tbody tr")].map(
      (tr) => Object.fromEntries([...tr.cells].map((td) => [td.dataset.key, td.dataset.value])))};
})()"""
CANVAS_RECT = "JSON.stringify(document.querySelector('#chart-grad canvas').getBoundingClientRect())"


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)


def line_pixels(png: bytes, colour: tuple[int, int, int], tol: int = 60) -> int:
    """Pixels close to a series' colour: the curve itself, not the axes or the grid (grey)."""
    return int((np.abs(rgb(png) - np.array(colour)).sum(axis=2) < tol).sum())


def drawn_fraction(png: bytes) -> float:
    return float((rgb(png) != 255).any(axis=2).mean())


async def check_chart_drawn(page, path=None) -> None:
    """The page is not blank and the ‖∇f‖² curve is drawn (its colour in the chart's canvas); ``path``: save it."""
    if path is not None:
        full = await page.screenshot()
        path.write_bytes(full)
        assert len(np.unique(rgb(full)[::4, ::4].reshape(-1, 3), axis=0)) > 50, "blank page"
    rect = json.loads(await page.eval(CANVAS_RECT))
    clip = await page.screenshot({"x": rect["x"], "y": rect["y"], "width": rect["width"], "height": rect["height"]})
    assert line_pixels(clip, GRAD_RGB) > 200, "the ‖∇f‖² curve is not drawn"
    assert drawn_fraction(clip) > 0.02


async def test_dashboard_follows_a_live_ef21_run(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "ef21", "run", "--workers", "2", "--k", "2", "--stepsize-mult", "256", "--x0", "normal:0",
        "--rounds", "1000000", "-q", stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    browser = None
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        second = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "status: http://" in first, first
        url = re.search(r"dashboard (http://\S+/);", second).group(1)
        browser = await Browser.launch(tmp_path / "profile")
        page = await browser.new_page()
        await page.goto(url)
        await page.wait_for("Number(document.body.dataset.round) > 20", what="the page to follow the run")
        workers = children(proc.pid)
        assert len(workers) == 2
        for w in workers:  # freeze the run (the master waits for the round) to compare the page with /status
            os.kill(w, signal.SIGSTOP)
        try:
            status = None
            for _ in range(100):
                _, a = await asyncio.to_thread(http_get, url + "status")
                await asyncio.sleep(0.3)
                _, status = await asyncio.to_thread(http_get, url + "status")
                if a["round"] == status["round"]:
                    break
            r = status["round"]
            # Two polls of the page after the run stood still, so that what it shows is the frozen state.
            polls = int(await page.eval("document.body.dataset.polls"))
            await page.wait_for(f"Number(document.body.dataset.polls) >= {polls + 2}", what="the page to poll")
            await page.wait_for(f"document.body.dataset.round === '{r}' && "
                                f"document.body.dataset.historyRound === '{r - 1}'", what=f"round {r} on the page")
            _, status = await asyncio.to_thread(http_get, url + "status")
            shown = await page.eval(SHOWN)
            lat = status["latest"]
            assert int(shown["round"]) == r and shown["state"] == status["state"] == "running"
            assert float(shown["f"]) == lat["f"] and float(shown["grad"]) == lat["last_grad_norm_sq"]
            assert float(shown["G"]) == lat["G"] and float(shown["gnorm"]) == status["g_norm_sq"]
            assert float(shown["bits"]) == lat["bits_per_worker"]
            assert int(shown["up"]) == lat["wire_bytes_up"] and int(shown["down"]) == lat["wire_bytes_down"]
            assert int(shown["eval"]) == lat["eval_bytes"]
            # The header's round traffic and the table's whole streams are different figures, and say so.
            assert {"round bytes up", "round bytes down", "eval bytes", "stream bytes up",
                    "stream bytes down"} <= set(shown["labels"])
            assert int(shown["connected"]) == status["workers_connected"] == 2
            rows = {int(w["rank"]): w for w in shown["rows"]}
            for w in status["workers"]:
                row = rows[w["rank"]]
                assert row["state"] == w["state"] and row["address"] == w["address"]
                for key in ("rounds_done", "bytes_up", "bytes_down", "late_messages"):
                    assert int(row[key]) == w[key], key
            assert int(shown["points"]) == r  # rounds 0 … r−1: every closed round is on the curve
            await check_chart_drawn(page, tmp_path / "dashboard.png")
        finally:
            for w in workers:
                os.kill(w, signal.SIGCONT)
        await page.wait_for(f"Number(document.getElementById('chart-grad').dataset.points) > {r + 20}",
                            what="new points on the curve")
        assert browser.errors == []
    finally:
        if browser is not None:
            await browser.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 130, err.decode()


def spki_hash(pki) -> str:  # noqa: F811
    """What Chromium's --ignore-certificate-errors-spki-list wants: base64 SHA-256 of the certificate's key."""
    pub = subprocess.run(["openssl", "x509", "-in", str(pki / "server.pem"), "-pubkey", "-noout"],
                         capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True,
                         check=True).stdout
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(der).digest()).decode()


async def test_dashboard_over_https_with_a_status_token(pki, tmp_path):  # noqa: F811
    sec = ServerSecurity(pki / "server.pem", pki / "server.key", token=TOKEN, status_token=True)
    cfg = RunConfig(workers=2, k=2, stepsize_mult=64, x0="normal:0", rounds=1000000)
    master = Master(MasterOptions(cfg), ListenOptions(port=0, status_port=0, drain_s=1.0), security=sec)
    await master.start()
    procs, browser = [], None
    try:
        for _ in range(2):
            procs.append(await asyncio.create_subprocess_exec(
                PY, "-m", "ef21_worker", "--master", master.address, "--tls-ca", str(pki / "ca.pem"),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, "EF21_TOKEN": TOKEN}))
        url = master.status_url
        assert url.startswith("https://")
        # The browser trusts exactly the master's certificate (its key's hash), nothing else.
        browser = await Browser.launch(tmp_path / "profile", f"--ignore-certificate-errors-spki-list={spki_hash(pki)}")
        page = await browser.new_page()
        await page.goto(url)
        await page.wait_for("!document.getElementById('auth').hidden", what="the token prompt")
        assert await page.eval("document.getElementById('v-round').dataset.value || ''") == ""
        await page.goto("about:blank")
        await page.goto(url + "#token=" + TOKEN)
        await page.wait_for("Number(document.body.dataset.round) > 5", what="the run over HTTPS with the token")
        assert TOKEN not in await page.eval("location.href")  # taken out of the address bar
        assert await page.eval("document.getElementById('auth').hidden")
        await page.wait_for("Number(document.getElementById('chart-grad').dataset.points) > 5")
        await check_chart_drawn(page, tmp_path / "dashboard-https.png")
        for axis, label in (("bits_per_worker", "bits per worker"), ("elapsed_s", "wall time (s)")):
            await page.eval(f"document.querySelector('input[value={axis}]').click()")
            assert await page.eval("charts.map((u) => u.axes[0].label)") == [label] * 3  # drawn on the canvas
            await check_chart_drawn(page)
        assert browser.errors == []
    finally:
        if browser is not None:
            await browser.close()
        await master.shutdown()
        await finish(procs, timeout=30)
