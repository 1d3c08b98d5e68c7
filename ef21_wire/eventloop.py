"""Which asyncio event loop runs a master or a worker: the standard one, or uvloop (``pip install 'ef21[fast]'``).

uvloop trims the per-message cost of the event loop itself; ``benchmarks/round_rate.py --event-loop uvloop``
measures what it buys against the same floor run on uvloop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from ef21.errors import UserError

T = TypeVar("T")
EVENT_LOOPS = ("asyncio", "uvloop")


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    if loop == "asyncio":
        return asyncio.run(main)
    if loop != "uvloop":
        main.close()
        raise UserError(f"unknown event loop {loop!r}; choose one of {', '.join(EVENT_LOOPS)}")
    try:
        import uvloop
    except ImportError:
        main.close()
        raise UserError("--event-loop uvloop needs the uvloop package: pip install 'ef21[fast]'") from None
    return uvloop.run(main)
