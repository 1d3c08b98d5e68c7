"""What the master prints on a console: the end-of-run summary line and ``ef21 status``'s readable form."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .master import Master


def print_summary(master: Master) -> None:
    c = master.coord
    rec = c.latest
    if rec is None:
        print(f"run {c.state}: {c.stop_message}")
        return
    # f and G are unknown (None) when the last round left workers out.
    print(f"round {rec.round}: f={_fmt(rec.f, '.10g')} |grad f|^2={_fmt(c.last_grad_norm_sq, '.6e')} "
          f"G={_fmt(rec.G, '.3e')} bits/worker={rec.bits_per_worker:.0f} "
          f"wire up={rec.wire_bytes_up} B down={rec.wire_bytes_down} B ({c.stop_message})")


def _fmt(v: object, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def format_status(doc: dict) -> str:
    lat = doc.get("latest") or {}
    lines = [
        f"run {doc['run_id']}: {doc['state']}" + (f" ({doc['detail']})" if doc.get("detail") else ""),
        f"  {doc['method']} / {doc['compressor']} k={doc['k']}  gamma={_fmt(doc['gamma'])}  on {doc['data']} "
        f"({doc['problem']})",
        f"  round {doc['round']} of {doc['rounds_planned']}  {_fmt(doc['rounds_per_second'], '.1f')} rounds/s  "
        f"elapsed {_fmt(doc['elapsed_s'], '.1f')} s",
        f"  f={_fmt(lat.get('f'), '.8g')}  |grad f|^2={_fmt(lat.get('last_grad_norm_sq'), '.3e')}  "
        f"G={_fmt(lat.get('G'), '.3e')}  bits/worker={_fmt(lat.get('bits_per_worker'), '.0f')}",
        f"  workers {doc['workers_connected']}/{doc['workers_expected']} connected",
    ]
    for w in doc["workers"]:
        lines.append(f"    rank {w['rank']:>3}  {w['state']:<8} {w['hostname']:<20} {w['address']:<24} "
                     f"rounds {w['rounds_done']:>6}  up {w['bytes_up']:>10} B  down {w['bytes_down']:>10} B  "
                     f"seen {w['last_seen_ago_s']:.1f} s ago")
    return "\n".join(lines)
