"""Headless Chromium driven over the DevTools protocol, for the dashboard tests.

The protocol travels over ``--remote-debugging-pipe`` (JSON messages ending in NUL on file descriptors 3 and 4)
rather than a websocket: no port to find or to leave open, and nothing to install beyond Debian's ``chromium``.
Asynchronous, so a master running in the test's own event loop keeps serving while the test waits on the page.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio"]


class BrowserError(Exception):
    pass


class Browser:
    def __init__(self, proc: asyncio.subprocess.Process, to_browser: int, from_browser: asyncio.StreamReader,
                 transport: asyncio.BaseTransport) -> None:
        self.proc = proc
        self._out = to_browser
        self._in = from_browser
        self._transport = transport
        self._next = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.errors: list[str] = []
        """JavaScript exceptions and console errors of every page."""
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    @classmethod
    async def launch(cls, profile: Path, *extra: str, size: tuple[int, int] = (1400, 1000)) -> Browser:
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed")
        cmd_r, cmd_w = os.pipe()  # test → browser (its fd 3)
        ev_r, ev_w = os.pipe()  # browser → test (its fd 4)
        # bash puts the pipe ends on the descriptors Chromium expects; fresh profile, nothing from the network.
        shell = f'exec "$0" "$@" 3<&{cmd_r} 4>&{ev_w} {cmd_r}<&- {ev_w}>&-'
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", shell, CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
            f"--window-size={size[0]},{size[1]}", *extra, "about:blank",
            pass_fds=(cmd_r, ev_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(ev_w)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)  # screenshots come back as one base64 message
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(ev_r, "rb", buffering=0))
        return cls(proc, cmd_w, reader, transport)

    async def _read(self) -> None:
        try:
            while True:
                raw = await self._in.readuntil(b"\0")
                msg = json.loads(raw[:-1])
                if "id" in msg and msg["id"] in self._pending:
                    fut = self._pending.pop(msg["id"])
                    if not fut.done():
                        fut.set_result(msg)
                elif msg.get("method") == "Runtime.exceptionThrown":
                    self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
                elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
                    self.errors.append(json.dumps(msg["params"]["args"])[:500])
        except (asyncio.IncompleteReadError, ConnectionError):
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BrowserError("chromium went away"))

    async def send(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 30.0) -> dict:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def new_page(self, size: tuple[int, int] = (1400, 1000)) -> Page:
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, session)
        for method in ("Page.enable", "Runtime.enable"):
            await page.send(method)
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
        return page

    async def close(self) -> None:
        try:
            await self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        self._transport.close()
        os.close(self._out)


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict | None = None) -> dict:
        return await self.browser.send(method, params, self.session)

    async def goto(self, url: str) -> None:
        reply = await self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"{url}: {reply['errorText']}")

    async def eval(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """Until the expression is truthy in the page; its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await self.eval(expression)
            except BrowserError:
                last = None  # the page is still loading
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or expression} (last value {last!r}); "
                             f"page errors: {self.browser.errors}")

    async def screenshot(self, clip: dict | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode((await self.send("Page.captureScreenshot", params))["data"])
