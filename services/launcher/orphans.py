"""Children that end when the launcher does, even when it is SIGKILLed.

Every child runs in a session of its own (``start_new_session=True``), so a
Ctrl-C meant for the launcher does not hit the services before the launcher
stops them in order. The price: nothing ties a child to the launcher any more,
and a launcher that is SIGKILLed (or OOM-killed) cannot clean up, which would
leave the services and the redis-server running with no one to stop them,
holding the port for the next ``scalellm up``.

On Linux, ``prctl(PR_SET_PDEATHSIG)`` asks the kernel to signal the child when
its parent goes, whatever the parent's manner of death. It is set in the
child between fork and exec (``preexec_fn``) and survives the exec.

Two caveats, both documented where children are started:

- "The parent" is the *thread* that forked the child: start children only from
  a thread that lives as long as they should (the launcher's main thread).
- Only the child itself is covered, not what it starts in turn.

Elsewhere (macOS) there is no such call; ``die_with_parent`` then returns None
and an orphan remains possible.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``signum`` when its parent dies; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Looked up here, in the parent: between fork and exec the child should
        # do as little as possible (other threads' locks are frozen in it).
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    number = int(signum)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0)
        # The parent may have died between fork and prctl: then no signal comes.
        # SIGKILL, not ``signum``: until exec the child still has the parent's
        # Python signal handlers, which would only set a flag.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec
