"""TLS, mutual TLS and run tokens, with certificates made here; a rogue client beside an honest run."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from ef21.engine.config import RunConfig
from ef21.engine.simulate import simulate
from ef21_server.coordinator import MasterOptions
from ef21_server.master import ListenOptions, Master
from ef21_server.security import ServerSecurity
from ef21_wire.protocol import PROTOCOL_VERSION, TRAIN_METHOD
from ef21_wire.v1 import ef21_pb2 as pb
from ef21_wire.v1.ef21_pb2_grpc import MasterStub

from .helpers import finish, http_get, spawn_worker
from .pki import make_pki, needs_openssl

TOKEN = "s3cret-run-token"

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    return make_pki(tmp_path_factory.mktemp("pki"), "ef21 test CA", {"server": "ef21 server", "client": "ef21 client"})


CFG = RunConfig(workers=2, method="ef21", k=2, stepsize_mult=64, x0="normal:0", rounds=40)


async def run_with(security: ServerSecurity, worker_args: list[list[str]], tmp_path, env=None):
    opts = MasterOptions(CFG, out=tmp_path / "x.npy")
    master = Master(opts, ListenOptions(port=0, status_port=0, drain_s=1.0), security=security)
    await master.start()
    try:
        procs = []
        for args in worker_args:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ef21_worker", "--master", master.address, "--connect-timeout", "5", *args,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, **(env or {})}))
        return master, await finish(procs, timeout=60)
    finally:
        await master.shutdown()


async def test_tls_run(pki, tmp_path):
    sec = ServerSecurity(pki / "server.pem", pki / "server.key")
    master, results = await run_with(sec, [["--tls-ca", str(pki / "ca.pem")]] * 2, tmp_path)
    assert [c for c, _ in results] == [0, 0], results
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(CFG).x)


async def test_status_endpoint_speaks_https_under_tls(pki):
    """With TLS the status endpoint serves HTTPS with the gRPC certificate: a client that trusts the CA reads
    /status and /healthz; plain HTTP gets no document."""
    sec = ServerSecurity(pki / "server.pem", pki / "server.key")
    master = Master(MasterOptions(CFG), ListenOptions(port=0, status_port=0, drain_s=1.0), security=sec)
    await master.start()
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))  # verifies the chain and 127.0.0.1

        def get(url: str, context=None) -> tuple[int, bytes]:
            with urllib.request.urlopen(url, timeout=5, context=context) as r:
                return r.status, r.read()

        base = f"127.0.0.1:{master.http.port}"
        code, body = await asyncio.to_thread(get, f"https://{base}/status", ctx)
        assert code == 200 and json.loads(body)["state"] == "waiting"
        assert (await asyncio.to_thread(get, f"https://{base}/healthz", ctx))[0] == 200
        with pytest.raises(urllib.error.URLError):  # an unknown CA: the certificate is really checked
            await asyncio.to_thread(get, f"https://{base}/status", ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            await asyncio.to_thread(get, f"http://{base}/status")
    finally:
        await master.shutdown()


async def test_plaintext_client_cannot_talk_to_a_tls_master(pki, tmp_path):
    sec = ServerSecurity(pki / "server.pem", pki / "server.key")
    master, results = await run_with(sec, [[]], tmp_path)
    code, err = results[0]
    assert code == 4 and "unreachable" in err
    assert master.coord.sessions == {}


async def test_mutual_tls_run_and_a_worker_without_client_certificate_is_refused(pki, tmp_path):
    sec = ServerSecurity(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    good = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key",
            str(pki / "client.key")]
    bad = ["--tls-ca", str(pki / "ca.pem")]
    opts = MasterOptions(CFG, out=tmp_path / "x.npy")
    master = Master(opts, ListenOptions(port=0, status_port=None, drain_s=1.0), security=sec)
    await master.start()
    try:
        intruder = await spawn_worker(master.address, "--connect-timeout", "3", *bad)
        (code, err), = await finish([intruder])
        assert code == 4 and "unreachable" in err  # the TLS handshake fails: no stream is ever opened
        assert master.coord.sessions == {}
        results = await finish([await spawn_worker(master.address, *good) for _ in range(2)])
        assert [c for c, _ in results] == [0, 0], results
    finally:
        await master.shutdown()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(CFG).x)


async def test_token_required_and_never_logged(tmp_path, caplog):
    sec = ServerSecurity(token=TOKEN, status_token=True)
    opts = MasterOptions(CFG, out=tmp_path / "x.npy")
    master = Master(opts, ListenOptions(port=0, status_port=0, drain_s=1.0), security=sec)
    await master.start()
    try:
        wrong = await spawn_worker(master.address, "--token", "guess")
        none = await spawn_worker(master.address)
        for code, err in await finish([wrong, none]):
            assert code == 1 and "UNAUTHENTICATED" in err
        assert master.coord.sessions == {}
        url = f"http://127.0.0.1:{master.http.port}/status"
        code, doc = await asyncio.to_thread(http_get, url)
        assert code == 401
        wrong = urllib.request.Request(url, headers={"Authorization": "Bearer http-guess"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, wrong, timeout=5)
        assert refused.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with await asyncio.to_thread(urllib.request.urlopen, req, timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["state"] == "waiting"
        procs = []
        for _ in range(2):  # the token through the environment, as a secret would be
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ef21_worker", "--master", master.address, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "EF21_TOKEN": TOKEN}))
        assert [c for c, _ in await finish(procs)] == [0, 0]
    finally:
        await master.shutdown()
    # Each refusal is logged with the peer's address (gRPC's ipv4:HOST:PORT; the status endpoint's (HOST, PORT))
    # and never with a token, right or wrong.
    refusals = [r.getMessage() for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert sum(bool(re.fullmatch(r"unauthenticated Join from ipv4:127\.0\.0\.1:\d+: missing or wrong run token", m))
               for m in refusals) >= 2, refusals  # the wrong token and the missing one
    assert sum(bool(re.fullmatch(r"unauthenticated status request from \('127\.0\.0\.1', \d+\)", m))
               for m in refusals) == 2, refusals
    assert TOKEN not in caplog.text and "guess" not in caplog.text
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(CFG).x)


async def test_rogue_client_beside_an_honest_run(tmp_path):
    """Every kind of refusal a stranger can provoke without owning a rank, while two honest workers train."""
    sec = ServerSecurity(token=TOKEN)
    cfg = RunConfig(**(CFG.to_dict() | {"rounds": 150}))
    opts = MasterOptions(cfg, out=tmp_path / "x.npy", max_faults=100)
    master = Master(opts, ListenOptions(port=0, status_port=None, drain_s=1.0), security=sec)
    await master.start()
    auth = (("authorization", f"Bearer {TOKEN}"),)
    try:
        honest = []
        for _ in range(2):
            honest.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ef21_worker", "--master", master.address, "--delay", "0.01",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, "EF21_TOKEN": TOKEN}))
        while master.coord.round < 5:
            await asyncio.sleep(0.05)
        run_id = master.coord.run_id

        async def train(*raw_msgs: bytes, metadata=auth) -> grpc.StatusCode:
            async with grpc.aio.insecure_channel(master.address) as ch:
                call = ch.stream_stream(TRAIN_METHOD)(metadata=metadata)
                try:  # the writes too: a refusal can end the call before the client has written everything
                    for raw in raw_msgs:
                        await call.write(raw)
                    while True:
                        if await call.read() is grpc.aio.EOF:
                            return await call.code()
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

        def msg(**kind) -> bytes:
            return pb.WorkerMessage(**kind).SerializeToString()

        async with grpc.aio.insecure_channel(master.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await MasterStub(ch).Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        hello = pb.Hello(run_id=run_id, requested_rank=0, data_fingerprint=master.coord.reference[0], dim=112,
                         n_rows=8124)
        # Nothing written: the master refuses a tokenless stream before reading it, and a client write that
        # races that refusal is answered by gRPC's own INTERNAL ("Internal error from Core", 14 in 300 tries
        # on this machine) in place of the master's status. The Hello it would have sent changes nothing.
        before = master.coord.refused.get("UNAUTHENTICATED", 0)
        assert await train(metadata=None) == grpc.StatusCode.UNAUTHENTICATED
        assert master.coord.refused.get("UNAUTHENTICATED", 0) == before + 1
        assert await train(msg(update=pb.Update(round=0))) == grpc.StatusCode.FAILED_PRECONDITION  # before join
        assert await train(b"\x0a\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT  # malformed
        assert await train(b"\x00" * (8 * 112 * 112 + 16 * 112 + 64 * 1024 + 1)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED  # larger than anything d = 112 allows
        assert await train(msg(hello=hello)) == grpc.StatusCode.ALREADY_EXISTS  # another worker's rank
        assert await train(msg(hello=pb.Hello(**{**_fields(hello), "requested_rank": -1}))) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED  # no free rank
        assert await train(msg(hello=pb.Hello(**{**_fields(hello), "run_id": "forged"}))) == \
            grpc.StatusCode.ABORTED
        assert await train(msg(hello=pb.Hello(**{**_fields(hello), "data_fingerprint": "x"}))) == \
            grpc.StatusCode.FAILED_PRECONDITION
        results = await finish(honest)
        assert [c for c, _ in results] == [0, 0], results
    finally:
        await master.shutdown()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), simulate(cfg).x)


def _fields(m) -> dict:
    return {f.name: v for f, v in m.ListFields()}
