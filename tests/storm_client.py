"""A join storm from its own process (``python -m tests.storm_client ADDRESS STREAMS CHANNELS``): that many Train
streams opened at once over that many channels, none of which says anything; prints how each ended, as JSON
(status name → count). Its own process, so the master's event loop takes the calls at its own pace, as it does
when thousands of workers start together."""

from __future__ import annotations

import asyncio
import collections
import json
import sys

import grpc

from ef21_wire.protocol import TRAIN_METHOD


async def silent_stream(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """A Train stream that sends nothing: its status once the master ends it."""
    call = channel.stream_stream(TRAIN_METHOD)()
    try:
        await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return await call.code()


async def storm(address: str, streams: int, channels: int) -> collections.Counter:
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    try:
        codes = await asyncio.gather(*(silent_stream(chans[i % channels]) for i in range(streams)))
        return collections.Counter(code.name for code in codes)
    finally:
        await asyncio.gather(*(ch.close() for ch in chans))


if __name__ == "__main__":
    address, streams, channels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(storm(address, streams, channels))))
