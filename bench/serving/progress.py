"""A progress bar on stderr: tqdm's when tqdm is installed, else a plain one (no dependency added)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """Counts finished requests. ``enabled=False`` prints nothing."""

    def __init__(
        self,
        total: int,
        label: str = "requests",
        *,
        enabled: bool = True,
        use_tqdm: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.failed = 0
        self._bar: Any = None
        self._start = time.perf_counter()
        self._last_line = -1
        if not (enabled and use_tqdm):
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=label, unit="req", file=self.stream, leave=True, dynamic_ncols=True)

    def update(self, ok: bool = True) -> None:
        self.done += 1
        self.failed += not ok
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            return
        self._plain()

    def _plain(self) -> None:
        interactive = self.stream.isatty()
        # On a terminal: redraw in place. In a log: a line per tenth of the run, and the last.
        tenth = self.done * 10 // max(1, self.total)
        if not interactive and tenth == self._last_line and self.done != self.total:
            return
        self._last_line = tenth
        width = 30
        filled = width * self.done // max(1, self.total)
        elapsed = time.perf_counter() - self._start
        failed = f", {self.failed} failed" if self.failed else ""
        line = (
            f"{self.label}: [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:.1f} s{failed}"
        )
        self.stream.write(("\r" + line) if interactive else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.stream.isatty() and self.done:
            self.stream.write("\n")
            self.stream.flush()
