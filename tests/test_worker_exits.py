"""No worker waits on a master whose run has ended: told, it exits 0 at once; the master gone for good, it gives
up after --connect-timeout with status 4 (the worker's exit statuses: docs, Running it for real)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import grpc

from ef21.engine.config import RunConfig
from ef21_server.coordinator import MasterOptions
from ef21_wire.v1 import ef21_pb2 as pb

from .helpers import finish, running_master, spawn_worker
from .rawclient import Ended, RawClient
from .test_reliability import free_port


async def test_no_worker_waits_on_a_run_that_ended(tmp_path):
    """A worker that comes to a master whose run has ended is told so and exits 0, at once; one whose master has
    gone for good gives up after --connect-timeout and exits 4 (not 1: nothing refused it)."""
    cfg = RunConfig(workers=2, rounds=20, k=2)
    async with running_master(MasterOptions(cfg)) as master:
        assert [c for c, _ in await finish([await spawn_worker(master.address) for _ in range(2)])] == [0, 0]
        await asyncio.wait_for(master.wait(), 10)
        late = await spawn_worker(master.address, "--rank", "1", "-v")
        (code, err), = await finish([late], timeout=30)
        assert code == 0, err
        async with grpc.aio.insecure_channel(master.address) as ch:  # and a Hello after the end: the run's Stop
            c = RawClient(ch, cfg)
            stop = await c.hello(0, run_id=master.coord.run_id)
            assert isinstance(stop, pb.MasterMessage) and stop.stop.reason.startswith("rounds: 20 rounds done")
            end = await c.recv()
            assert isinstance(end, Ended) and end.code == grpc.StatusCode.OK, end
        address = master.address
    gone = await spawn_worker(address, "--connect-timeout", "2")
    (code, err), = await finish([gone], timeout=30)
    assert code == 4 and "unreachable for 2 s" in err, (code, err)


def test_a_worker_whose_master_died_mid_run_gives_up_with_status_4(tmp_path):
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "ef21", "master", "--port", str(port), "--status-port", "-1",
                               "--workers", "2", "--rounds", "100000", "--log", str(tmp_path / "l.jsonl")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:  # the master listens before the workers start: their --connect-timeout is short
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and master.poll() is None, "the master did not start"
            time.sleep(0.1)
    workers = [subprocess.Popen([sys.executable, "-m", "ef21_worker", "--master", f"127.0.0.1:{port}",
                                 "--connect-timeout", "3", "--delay", "0.005"], stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "l.jsonl").exists() or (tmp_path / "l.jsonl").stat().st_size < 20_000:
            assert time.monotonic() < deadline and master.poll() is None, "the run did not start"
            time.sleep(0.1)
        master.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for w in workers:
            _, err = w.communicate(timeout=30)
            assert w.returncode == 4 and "unreachable for 3 s" in err, (w.returncode, err)
        assert time.monotonic() - killed < 15  # --connect-timeout and a retry, not minutes
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.kill()
