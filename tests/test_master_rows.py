"""--master-rows: how the master keeps every worker's g_i, and what each setting gives up (real processes)."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21.errors import UserError
from ef21_server.coordinator import Coordinator, MasterOptions

from .helpers import eventually, finish, running_master, spawn_worker

CFG = RunConfig(workers=4, method="ef21", k=2, stepsize_mult=256, x0="normal:0", rounds=5000, tol=1e-7)


@pytest.mark.parametrize("flag", ["checkpoint", "resume"])
def test_no_rows_refuses_checkpoints_in_one_line(tmp_path, flag):
    with pytest.raises(UserError) as err:
        Coordinator(MasterOptions(CFG, master_rows="none", **{flag: tmp_path / "ck"}))
    assert "--master-rows none" in str(err.value) and "\n" not in str(err.value)


def test_no_rows_is_refused_for_ef21plus():
    with pytest.raises(UserError, match="ef21plus needs every g_i"):
        Coordinator(MasterOptions(RunConfig(workers=4, method="ef21plus", k=2), master_rows="none"))


@pytest.mark.parametrize("rows", ["full", "float32"])
async def test_replacement_continues_from_the_masters_rows(tmp_path, rows):
    """A killed worker's replacement starts from the master's copy of its g_i. Full rows: the run ends on the
    uninterrupted run's x, bit for bit. float32 rows: the replacement's g_i is rounded, so the run leaves the
    uninterrupted one by about the rounding (EF21's feedback keeps it converging) and still reaches --tol."""
    opts = MasterOptions(CFG, log=tmp_path / "l.jsonl", master_rows=rows)
    async with running_master(opts) as master:
        procs = [await spawn_worker(master.address, "--rank", str(r), "--delay", "0.002") for r in range(4)]
        await eventually(lambda: master.coord.round >= 60, what="round 60")
        procs[1].send_signal(signal.SIGKILL)
        await eventually(lambda: master.coord.sessions[1].state == "lost", what="rank 1 marked lost")
        held = master.coord.master.rows
        assert held.dtype == (np.float64 if rows == "full" else np.float32) and held[1].any()
        procs[1] = await spawn_worker(master.address, "--rank", "1")  # no --round-timeout: the run waits for it
        results = await finish(procs, timeout=120)
        assert all(code == 0 for code, _ in results), results
        await master.wait()
    assert master.coord.stop_reason == "tol"
    ref = simulate(CFG)
    x = master.coord.master.x
    if rows == "full":
        np.testing.assert_array_equal(x, ref.x)
    else:  # another run, a few rounds apart at the tolerance
        assert 0.0 < np.linalg.norm(x - ref.x) / np.linalg.norm(ref.x) < 1e-3
        assert abs(master.coord.round - ref.records[-1].round) <= 0.1 * ref.records[-1].round
