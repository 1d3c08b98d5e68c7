"""``ef21 master``, ``ef21 status`` and ``ef21 run`` (a local cluster), and the ``ef21-master`` script."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ef21.cli.args import add_config_args, add_output_args, config_from_args
from ef21.cli.configfile import effective_config, explicit_dests, print_config
from ef21.cli.configfile import info as cli_info
from ef21.cli.exits import EXIT_JOIN_TIMEOUT
from ef21.cli.runlog import ensure_parent
from ef21.engine.config import RunConfig
from ef21.errors import UserError
from ef21_wire import eventloop
from ef21_wire.auth import resolve_token
from ef21_wire.eventloop import EVENT_LOOPS
from ef21_worker.channel import add_client_security_args, client_security_from_args

from . import checkpoint
from .console import format_status, print_summary
from .coordinator import MasterOptions
from .master import ListenOptions, Master
from .security import ServerSecurity

DEFAULT_MASTER = "127.0.0.1:50051"
"""The workers did not come within --join-timeout (distinct from 1, a run that failed, and 2, bad input)."""


def add_master_args(p: argparse.ArgumentParser, *, local: bool = False) -> None:
    add_config_args(p)
    add_output_args(p)
    g = p.add_argument_group("master")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for all interfaces; default 127.0.0.1)")
    g.add_argument("--port", type=int, default=0 if local else 50051,
                   help="gRPC port (default %s)" % ("any free port" if local else "50051"))
    g.add_argument("--status-host", default=None, help="address of the HTTP status endpoint (default: --host)")
    g.add_argument("--status-port", type=int, default=0 if local else 8080,
                   help="HTTP status port, -1 for none (default %s)" % ("any free port" if local else "8080"))
    g.add_argument("--eval-every", type=int, default=1, metavar="R",
                   help="exact |grad f|^2 every R rounds (dense gradients, counted apart; default 1)")
    g.add_argument("--checksum-every", type=int, default=10, metavar="R",
                   help="check every replica against the master's every R rounds (default 10)")
    g.add_argument("--save-iterates", type=Path, default=None, help="write x^t of every round to this .npy")
    g.add_argument("--verbose", "-v", action="store_true", help="log joins, starts and stops")
    g.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio",
                   help="asyncio (default) or uvloop (pip install 'ef21[fast]')" +
                        ("; the workers use the same" if local else ""))
    r = p.add_argument_group("reliability")
    r.add_argument("--round-timeout", type=float, default=None, metavar="S",
                   help="close a round without the workers that have not delivered after S seconds (ef21, "
                        "ef21plus: EF21-PP; other methods always wait)")
    r.add_argument("--min-workers", type=int, default=None, metavar="M",
                   help="never close a round with fewer than M contributions (default 1 with a timeout, else n)")
    r.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                   help="checkpoint file, written every --checkpoint-every rounds and when the run ends")
    r.add_argument("--checkpoint-every", type=int, default=100, metavar="R")
    r.add_argument("--resume", type=Path, default=None, metavar="PATH",
                   help="continue the run saved in this checkpoint (PATH.prev if PATH is corrupt)")
    r.add_argument("--resume-if-exists", action="store_true",
                   help="continue from --checkpoint if it (or its .prev) exists, else start the run: for a master "
                        "that a scheduler restarts (a finished run is then reported done, not run again)")
    r.add_argument("--join-timeout", type=float, default=600.0, metavar="S",
                   help="fail with exit status %d when the workers have not all come S seconds after the start "
                        "(a resumed run: when no round has closed by then); default 600" % EXIT_JOIN_TIMEOUT)
    if not local:
        r.add_argument("--linger", action="store_true",
                       help="once the run has ended, keep serving its status (and its end to late workers) until "
                            "SIGTERM: for schedulers that restart a master that exits (Kubernetes)")
    r.add_argument("--max-faults", type=int, default=3,
                   help="bad messages from one client before it may no longer join (default 3); a client is its "
                        "certificate under mutual TLS (--tls-ca), else its host")
    r.add_argument("--master-rows", default="full", choices=("full", "float32", "none"),
                   help="how the master keeps every worker's g_i (n x d): full (exact hand-over and checkpoints; "
                        "default), float32 (half the memory; a replacement gets g_i rounded) or none (no hand-over, "
                        "no checkpoints)")
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM): turns TLS on")
    s.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    s.add_argument("--tls-ca", type=Path, default=None, help="require client certificates signed by this CA (mTLS)")
    s.add_argument("--token", default=None, help="run token workers must present (default: $EF21_TOKEN)")
    s.add_argument("--token-file", type=Path, default=None, help="read the run token from a file (a secret)")
    s.add_argument("--status-token", action="store_true", help="the HTTP status endpoint requires the token too")


def resumed_config(ns: argparse.Namespace) -> RunConfig:
    """With --resume, the run's configuration is the checkpoint's. Flags given explicitly (on the command line or
    in the config file) must agree with it, even where they repeat a default: only --rounds and --tol may change.
    The options left out take the checkpoint's values, written back into ``ns`` so that the effective
    configuration shows what runs."""
    from .checkpoint import load_latest

    ckpt, used, _ = load_latest(ns.resume)
    saved = RunConfig.from_dict(ckpt.meta["config"]).to_dict()
    explicit = explicit_dests(ns)
    for dest, value in saved.items():
        if dest not in explicit and hasattr(ns, dest):
            setattr(ns, dest, value)
    cfg = config_from_args(ns).to_dict()
    differ = [k for k in saved if k not in ("rounds", "tol") and cfg[k] != saved[k]]
    if differ:
        flag = {dest: key for key, dest in (cli_info(ns).keys.items() if cli_info(ns) else ())}
        raise UserError(f"--resume {used}: the checkpoint is of another run: " + ", ".join(
            f"--{flag.get(k, k)} {cfg[k]} (checkpoint: {saved[k]})" for k in differ)
            + "; only --rounds and --tol may change on resume")
    return RunConfig.from_dict(cfg)


def resolved_effective_config(ns: argparse.Namespace, cfg: RunConfig) -> dict:
    """The options as they took effect: the command's, with the run configuration's values as the run resolved
    them (a default the configuration fills in, e.g. --data's shipped mushrooms, or a resumed run's)."""
    eff = effective_config(ns)
    for name, value in cfg.to_dict().items():
        key = name.replace("_", "-")
        if key in eff:
            eff[key] = value
    return eff


def master_options(ns: argparse.Namespace) -> tuple[MasterOptions, ListenOptions, ServerSecurity]:
    if ns.resume_if_exists:
        if ns.checkpoint is None:
            raise UserError("--resume-if-exists needs --checkpoint PATH (the checkpoint to look for)")
        if ns.resume is not None:
            raise UserError("give --resume PATH or --resume-if-exists, not both")
        if ns.checkpoint.exists() or checkpoint.previous_path(ns.checkpoint).exists():
            ns.resume = ns.checkpoint
    cfg = resumed_config(ns) if ns.resume is not None else config_from_args(ns)
    if ns.plot is not None and ns.log is None:
        ns.log = ns.plot.with_suffix(".jsonl")
    # The run's files are written at the end; a folder that cannot exist is bad input now, not then.
    for flag in ("--out", "--plot", "--checkpoint", "--save-iterates"):
        path = getattr(ns, flag[2:].replace("-", "_"))
        if path is not None:
            ensure_parent(path, flag)
    mo = MasterOptions(cfg, eval_every=ns.eval_every, checksum_every=ns.checksum_every, log=ns.log, out=ns.out,
                       plot=ns.plot, save_iterates=ns.save_iterates, round_timeout=ns.round_timeout,
                       min_workers=ns.min_workers, checkpoint=ns.checkpoint, checkpoint_every=ns.checkpoint_every,
                       resume=ns.resume, max_faults=ns.max_faults, join_timeout=ns.join_timeout,
                       require_data=ns.command == "run", master_rows=ns.master_rows,
                       effective_config=resolved_effective_config(ns, cfg))
    lo = ListenOptions(host=ns.host, port=ns.port, status_host=ns.status_host,
                       status_port=None if ns.status_port < 0 else ns.status_port)
    sec = ServerSecurity(ns.tls_cert, ns.tls_key, ns.tls_ca, resolve_token(ns.token, ns.token_file),
                         ns.status_token)
    return mo, lo, sec


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def cmd_master(ns: argparse.Namespace) -> int:
    setup_logging(ns.verbose)
    mo, lo, sec = master_options(ns)

    async def main() -> int:
        master = Master(mo, lo, security=sec)
        c = master.coord
        print(f"ef21 master: run {c.run_id}, listening on {master.address}; "
              + (f"resumed from {c.resumed_from}; " if c.resumed_from else "")
              + f"waiting for {mo.config.workers} workers", flush=True)
        print_config(ns)  # after the address line, which scripts read first
        rc = await master.serve(linger=ns.linger)
        print_summary(master)
        if c.stop_reason == "join-timeout":
            print(f"ef21 master: error: {c.stop_message}", file=sys.stderr)
            return EXIT_JOIN_TIMEOUT
        return rc

    return eventloop.run(main(), ns.event_loop)


def cmd_status(ns: argparse.Namespace) -> int:
    from .status_client import fetch_grpc, fetch_url

    security = client_security_from_args(ns)
    if ns.config is not None:  # stdout is the status itself; say what the file set on stderr
        print_config(ns, file=sys.stderr)
    url = ns.url
    if ns.master is not None and ns.master.startswith(("http://", "https://")):
        url, ns.master = (url or ns.master), None  # the status URL given to --master: take it as meant
    if url is not None and ns.master is not None:
        raise UserError("give --master HOST:PORT (the gRPC port) or --url http://HOST:PORT (the status port), "
                        "not both")
    doc = fetch_url(url, security, ns.timeout) if url else fetch_grpc(ns.master or DEFAULT_MASTER, security,
                                                                       ns.timeout)
    if ns.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_status(doc))
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    from .cluster import run_local_cluster

    setup_logging(ns.verbose)
    mo, lo, sec = master_options(ns)
    if mo.config.objective is not None:
        from ef21.engine.plan import check_objective

        check_objective(mo.config)  # a user's objective that cannot work fails here, once, not in n workers
    return eventloop.run(run_local_cluster(mo, lo, sec, quiet=ns.quiet, max_restarts=ns.max_restarts,
                                           verbose=ns.verbose,
                                           event_loop=ns.event_loop), ns.event_loop)


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("master", help="run the gRPC master (parameter server)")
    add_master_args(m)
    m.set_defaults(func=cmd_master)

    s = sub.add_parser("status", help="print a running master's status")
    s.add_argument("--master", default=None, metavar="HOST:PORT",
                   help=f"the master's gRPC port (default {DEFAULT_MASTER})")
    s.add_argument("--url", default=None, metavar="URL",
                   help="or the master's HTTP status port, e.g. http://HOST:8080 (the dashboard's URL works too)")
    s.add_argument("--json", action="store_true", help="the raw status document")
    s.add_argument("--timeout", type=float, default=5.0)
    add_client_security_args(s)
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("run", help="a master and N worker processes on loopback (a local cluster)")
    add_master_args(r, local=True)
    r.add_argument("--max-restarts", type=int, default=3,
                   help="restart a worker process that dies, at most this many times in all (default 3)")
    r.set_defaults(func=cmd_run)

    from .export import register as register_export

    register_export(sub)
    from .aggregator_cli import register as register_aggregator

    register_aggregator(sub)
