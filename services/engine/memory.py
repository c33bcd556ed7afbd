"""Keeping the engine's resident memory flat over uptime.

Two things made a serving engine's RSS grow for as long as it ran, both
measured with torch 2.13 on the CPU (bench/soak.py; docs/operations.md "Soak"):

- **Per-shape kernel caches.** Every distinct matrix shape gets a oneDNN
  primitive, kept in two caches of 1024 entries each by default: torch's
  ideep layer (``LRU_CACHE_CAPACITY``) and oneDNN's own
  (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). An entry holds about 350 KB (its
  JIT code and scratch buffers), so the two can reach about 700 MB, filled
  one new shape at a time by the steps' token counts and the prefill chunks'
  attention shapes. A miss costs a primitive creation, small next to the op
  itself for this engine's shapes, so the engine caps both at
  ``KERNEL_CACHE_CAPACITY``, unless the operator set them.
- **Freed memory that glibc keeps.** What the caches evict, and the buffers of
  steps of other sizes, go back to malloc's free lists, not to the system;
  ``malloc_trim(0)`` hands whole free pages back. The engine calls it every
  ``TRIM_INTERVAL_S`` between steps: a few milliseconds, at most twice a minute.

Measured [Intel Xeon Sapphire Rapids, 2 cores, bf16]: 10 rounds of 48 random
requests through EngineCore grew RSS by +177 MB over 8 rounds with the defaults,
still rising; with both caches at 128 and a trim after each round it stayed at
2724-2725 MB from the third round on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

# Entries per kernel cache: enough for the shapes of a few steps in a row (all layers share
# a step's shapes), small enough that a full cache is a few tens of MB.
KERNEL_CACHE_CAPACITY = 128
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
TRIM_INTERVAL_S = 30.0


def bound_kernel_caches(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Cap torch's and oneDNN's per-shape caches unless already set; returns the values in force.

    Must run before torch creates its first primitive: both libraries read the
    variables once, on first use.
    """
    for name in KERNEL_CACHE_VARIABLES:
        environ.setdefault(name, str(KERNEL_CACHE_CAPACITY))
    return {name: environ[name] for name in KERNEL_CACHE_VARIABLES}


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on a C library without it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class MemoryTrimmer:
    """Returns malloc's free pages to the system at most once per interval."""

    def __init__(
        self,
        interval_s: float = TRIM_INTERVAL_S,
        trim: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._trim = trim if trim is not None else _glibc_malloc_trim()
        self._clock = clock
        self._next = clock() + interval_s
        if self._trim is None:
            log.info("no malloc_trim in this C library: freed memory is returned as malloc decides")

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed since the last trim; True if it did."""
        if self._trim is None:
            return False
        now = self._clock()
        if now < self._next:
            return False
        self._trim(0)
        self._next = self._clock() + self._interval_s
        return True
