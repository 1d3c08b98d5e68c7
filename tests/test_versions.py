"""Protocol version negotiation (protocol 8): a master and a worker of different protocol versions stop at the
first call, Join, each with one line naming both versions; the worker exits 2, as for any input that starting
again would not fix. Real processes: the in-process master on a real port, worker processes over TCP; the old
side is the same code with its PROTOCOL_VERSION set to 7 before anything imports it, which is what a protocol-7
peer sends at Join."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import ef21_server.service
from ef21.engine.config import RunConfig
from ef21_server.coordinator import MasterOptions
from ef21_wire.protocol import PROTOCOL_VERSION

from .helpers import finish, running_master, spawn_worker

OLD = 7
CFG = RunConfig(workers=1, method="ef21", k=2, rounds=5)


async def spawn_old_worker(target: str) -> asyncio.subprocess.Process:
    code = (f"import ef21_wire.protocol as p; p.PROTOCOL_VERSION = {OLD}; import runpy, sys; "
            f"sys.argv = ['ef21_worker', '--master', {target!r}, '--connect-timeout', '20']; "
            f"runpy.run_module('ef21_worker', run_name='__main__', alter_sys=True)")
    return await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def refusals(caplog) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records if "refused Join" in r.getMessage()]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


async def test_an_old_worker_is_refused_at_join_with_both_versions_in_both_logs(caplog):
    assert PROTOCOL_VERSION == 8
    caplog.set_level(logging.WARNING)
    async with running_master(MasterOptions(CFG)) as master:
        (code, err), = await finish([await spawn_old_worker(master.address)], timeout=240)
        assert master.coord.members.refused.get("FAILED_PRECONDITION") == 1
        assert master.coord.round == 0 and not master.coord.members.live  # nothing of the run was touched
    line = one_line(err)
    assert code == 2 and "FAILED_PRECONDITION" not in line, (code, err)
    assert "worker speaks protocol 7, the master 8" in line and line.startswith("ef21 worker: join refused:"), line
    (logged,) = refusals(caplog)
    assert "worker speaks protocol 7, the master 8" in logged


async def test_a_worker_meeting_an_old_master_stops_with_both_versions(caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(ef21_server.service, "PROTOCOL_VERSION", OLD)  # the master's side of Join speaks 7
    async with running_master(MasterOptions(CFG)) as master:
        (code, err), = await finish([await spawn_worker(master.address, "--connect-timeout", "20")], timeout=240)
    line = one_line(err)
    assert code == 2 and "worker speaks protocol 8, the master 7" in line, (code, err)
    (logged,) = refusals(caplog)
    assert "worker speaks protocol 8, the master 7" in logged
