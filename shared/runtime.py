"""What every service process does the same way: logging and stopping on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterable

from shared.failover import OwnPulse
from shared.messages import Heartbeat, Role
from shared.redaction import install_log_redaction
from shared.transport import StreamTransport

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Log to stderr; credentials in URLs, and ``secrets`` (settings.secrets()), are scrubbed from every line."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    install_log_redaction(secrets)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for a service loop to finish its batch and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def beat_until_stopped(
    transport: StreamTransport,
    role: Role,
    replica_id: str,
    interval_s: float,
    stop: asyncio.Event,
    *,
    ttl_s: float | None = None,
    pulse: OwnPulse | None = None,
    max_model_len: int | None = None,
) -> None:
    """Publish this replica's heartbeat every ``interval_s`` until ``stop`` is set.

    Once the heartbeat is ``ttl_s`` old (default: four intervals, so one late beat
    does not make the replica look dead) the replica counts as gone and its work
    is taken over (shared/failover.py). ``pulse`` learns whether each beat found
    the previous one still there. ``max_model_len``: the context length this replica
    enforces, carried in its heartbeat (a tokenizer's, for the gateway's model card).
    """
    ttl = 4 * interval_s if ttl_s is None else ttl_s
    while not stop.is_set():
        heartbeat = Heartbeat(role=role, replica_id=replica_id, time=time.time(), max_model_len=max_model_len)
        outcome = await transport.beat(heartbeat, ttl_s=ttl)
        if pulse is not None:
            pulse.record(outcome.renewed, time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
