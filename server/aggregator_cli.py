"""``ef21 aggregator``: the command that runs one block of the aggregator tier (``server.aggregator``)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from ef21_wire import eventloop
from ef21_wire.eventloop import EVENT_LOOPS
from ef21_worker.channel import add_client_security_args, client_security_from_args

from .aggregator import Aggregator
from .grpc_server import build_server

log = logging.getLogger("ef21.aggregator")

STOP_GRACE_S = 2.0  # seconds the workers' streams get to finish once the aggregator stops


async def serve(agg: Aggregator, address: str, *, linger: bool = False) -> int:
    """Join the master, listen for the block's workers, serve until the run is over (the master's Stop has passed
    through: exit 0, as the workers do) or SIGTERM/SIGINT; with ``linger``, until SIGTERM/SIGINT only."""
    reply = await agg.connect()
    if reply.ended and not linger:
        # Started (or restarted by an orchestrator) after the end: nothing to relay, and nothing went wrong.
        print(f"ef21 aggregator: the run at {agg.master} is over ({reply.ended}); nothing to relay", flush=True)
        return 0
    server, port = build_server(agg.handler(), address, peers=len(agg.block))
    await server.start()
    host = address.rsplit(":", 1)[0]
    # The first line on stdout: `ef21 run` (and scripts) read the port from it.
    print(f"ef21 aggregator: block {agg.block_index} (ranks {agg.block.start}..{agg.block.stop - 1}), listening on "
          f"{host}:{port}, master {agg.master}", flush=True)
    try:
        if linger:
            await server.wait_for_termination()
        else:
            await agg.over.wait()
    except asyncio.CancelledError:
        pass
    finally:
        # The grace lets the other workers' Stops, already on their way, reach them before their streams close.
        await server.stop(STOP_GRACE_S)
        await agg.close()
    return 0


def cmd_aggregator(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    agg = Aggregator(ns.master, ns.block, client_security_from_args(ns))
    return eventloop.run(serve(agg, f"{ns.host}:{ns.port}", linger=ns.linger), ns.event_loop)


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("aggregator", help="sum a block of workers' messages for the master (--aggregators F)")
    a.add_argument("--master", required=True, metavar="HOST:PORT", help="the master's gRPC address")
    a.add_argument("--block", type=int, required=True, metavar="J",
                   help="which block of ranks this aggregator serves, 0..F-1 (block J: ranks J*n//F .. "
                        "(J+1)*n//F - 1)")
    a.add_argument("--host", default="127.0.0.1", help="address the workers connect to (default 127.0.0.1)")
    a.add_argument("--port", type=int, default=50052, help="gRPC port for the workers (default 50052; 0: any)")
    a.add_argument("--linger", action="store_true",
                   help="once the run has ended, keep serving until SIGTERM (by default the aggregator exits 0 "
                        "after relaying the master's Stop, as the workers do): for schedulers that restart a "
                        "process that exits (a Kubernetes StatefulSet)")
    a.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    a.add_argument("--verbose", "-v", action="store_true")
    add_client_security_args(a)
    a.set_defaults(func=cmd_aggregator)
