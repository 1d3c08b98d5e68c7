"""``ef21 status`` as a newcomer uses it: the gRPC address or the status URL, and the wrong kind of port."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from ef21.engine.config import RunConfig
from ef21_server.coordinator import MasterOptions
from ef21_server.master import ListenOptions, Master
from ef21_server.security import ServerSecurity

from .helpers import running_master

PY = sys.executable


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ef21", "status", "--timeout", "3", *args], capture_output=True, text=True,
                          timeout=60)


async def test_status_by_grpc_address_or_by_url_and_hints_for_the_wrong_port():
    async with running_master(MasterOptions(RunConfig(workers=2, rounds=5))) as master:
        grpc_addr = master.address
        http_addr = f"127.0.0.1:{master.http.port}"
        by_grpc = await asyncio.to_thread(status, "--master", grpc_addr, "--json")
        assert by_grpc.returncode == 0, by_grpc.stderr
        assert json.loads(by_grpc.stdout)["run_id"] == master.coord.run_id
        # The status URL, as ef21 run prints it (with or without a path), through --url or through --master.
        for args in (["--url", f"http://{http_addr}"], ["--url", f"http://{http_addr}/"],
                     ["--url", f"http://{http_addr}/status"], ["--master", f"http://{http_addr}/"]):
            r = await asyncio.to_thread(status, *args)
            assert r.returncode == 0, (args, r.stderr)
            assert f"run {master.coord.run_id}: waiting" in r.stdout
        # --master at the HTTP port: gRPC says "Failed parsing HTTP/2"; we say which flag and port to use.
        r = await asyncio.to_thread(status, "--master", http_addr)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert (f"{http_addr} is the master's HTTP status port, not its gRPC port: use ef21 status --url "
                f"http://{http_addr} (or --master {grpc_addr})") in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        # --url at the gRPC port: HTTP/1.1 gets HTTP/2 back.
        r = await asyncio.to_thread(status, "--url", f"http://{grpc_addr}")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert (f"{grpc_addr} is the master's gRPC port, not its HTTP status port: use ef21 status --master "
                f"{grpc_addr} (or --url http://{http_addr}/)") in r.stderr, r.stderr
        r = await asyncio.to_thread(status, "--master", grpc_addr, "--url", f"http://{http_addr}")
        assert r.returncode == 2 and "not both" in r.stderr
        r = await asyncio.to_thread(status, "--url", f"ftp://{http_addr}")
        assert r.returncode == 2 and "expected http://HOST:PORT" in r.stderr


async def test_status_url_with_a_status_token():
    sec = ServerSecurity(token="tok", status_token=True)
    master = Master(MasterOptions(RunConfig(workers=2, rounds=5)), ListenOptions(port=0, status_port=0),
                    security=sec)
    await master.start()
    try:
        url = master.status_url
        r = await asyncio.to_thread(status, "--url", url)
        assert r.returncode == 2 and "needs the run token" in r.stderr
        for args in (["--url", url, "--token", "tok"], ["--url", url + "#token=tok"]):  # the dashboard's URL
            r = await asyncio.to_thread(status, *args)
            assert r.returncode == 0 and "waiting" in r.stdout, r.stderr
        r = await asyncio.to_thread(status, "--master", url.removeprefix("http://").rstrip("/"))
        assert r.returncode == 2 and "is the master's HTTP status port" in r.stderr and "run token" in r.stderr
    finally:
        await master.shutdown()
