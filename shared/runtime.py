"""What every service process does the same way: logging and stopping on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

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
