"""What every service process does the same way: logging and stopping on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Literal

from shared.messages import Heartbeat
from shared.transport import StreamTransport

Role = Literal["gateway", "tokenizer", "engine", "detokenizer"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for a service loop to finish its batch and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def beat_until_stopped(
    transport: StreamTransport, role: Role, replica_id: str, interval_s: float, stop: asyncio.Event
) -> None:
    """Publish this replica's heartbeat every ``interval_s`` until ``stop`` is set.

    The TTL is three intervals, so one late beat does not make the replica look dead.
    """
    while not stop.is_set():
        await transport.beat(Heartbeat(role=role, replica_id=replica_id, time=time.time()), ttl_s=3 * interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
