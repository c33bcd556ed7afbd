"""Streaming clients that stop reading: found, disconnected, their requests aborted.

A client that stops reading its stream does not close it: its socket's buffers
fill, uvicorn's ``send`` blocks the request's handler, and output piles up in
the request's OutputBuffer. Two limits end such a request (docs/api.md):

- its buffer passes SCALELLM_MAX_BUFFERED_BYTES_PER_REQUEST: the buffer says so
  at once, from inside the reader task's dispatch, so the reaction is
  synchronous (a flag and a queued abort, never an await);
- output has waited untaken for SCALELLM_SLOW_CLIENT_TIMEOUT_S (nginx's
  ``send_timeout`` in spirit): a sweep every quarter of the timeout finds it.
  A client waiting for a slow model has nothing pending and is never timed out.

Ending the response is not enough to free the connection: uvicorn closes a
connection whose response did not complete with ``transport.close()``, which
first flushes the very bytes the client is not reading, so the socket would
stay open for as long as the client cares to. ``ClientConnections`` gives the
response a way to reset the connection instead, dropping what it held. It also
fixes each connection's kernel send buffer (SCALELLM_CLIENT_SEND_BUFFER_BYTES):
autotuned, it grows to megabytes and hides a stalled client for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.output_buffer import OutputBuffer

# The key in an HTTP scope's "extensions" under which ClientConnections puts abort().
ABORT_CONNECTION = "scalellm.abort_connection"
MAX_SWEEP_INTERVAL_S = 1.0


class SlowClientMonitor:
    """Watches the buffers of streaming requests; calls back once for each slow client."""

    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.interval_s = min(MAX_SWEEP_INTERVAL_S, timeout_s / 4)
        self._clock = clock
        self._watched: dict[str, tuple[OutputBuffer, Callable[[str], None]]] = {}

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, request_id: str, buffer: OutputBuffer, on_slow: Callable[[str], None]) -> None:
        """Call ``on_slow(reason)`` once if the client stops reading; reason "buffer" or "timeout".

        The buffer must use the same clock as this monitor.
        """
        self._watched[request_id] = (buffer, on_slow)
        buffer.on_overflow = lambda: self._found(request_id, "buffer")

    def unwatch(self, request_id: str) -> None:
        watched = self._watched.pop(request_id, None)
        if watched is not None:
            watched[0].on_overflow = None

    def sweep(self) -> list[str]:
        """Report every watched request whose output has waited untaken for the timeout."""
        now = self._clock()
        stalled = [rid for rid, (buffer, _) in self._watched.items() if buffer.stalled_for(now) >= self.timeout_s]
        for request_id in stalled:
            self._found(request_id, "timeout")
        return stalled

    def _found(self, request_id: str, reason: str) -> None:
        watched = self._watched.pop(request_id, None)
        if watched is not None:
            watched[0].on_overflow = None
            watched[1](reason)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sweep()


def server_transport(send: Any) -> asyncio.Transport | None:
    """The transport behind a server's own ``send``, where it can be found.

    uvicorn passes its request cycle's bound ``send``, and the cycle holds the
    transport; there is no ASGI way to reach it, so this is best effort.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.Transport) else None


def bound_send_buffer(transport: asyncio.Transport, size: int) -> None:
    """Fix the kernel's send buffer of a client's socket (SO_SNDBUF, which Linux doubles).

    Autotuned, it grows to ``net.ipv4.tcp_wmem``'s maximum (4 MiB by default): that
    much of a stalled client's stream would sit in the kernel, charged to the
    gateway's memory, before the gateway's own bounds even saw the stall. Token
    streams need little of it: 256 KiB carries 2.5 MB/s at a 100 ms round trip.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a socket that has one: nothing to bound
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def reset_connection(transport: asyncio.Transport) -> None:
    """Abort a client's connection with a TCP reset.

    A plain close would still try to deliver what the kernel holds, for as long as
    the kernel keeps an orphaned socket, to a client that does not read it; with
    SO_LINGER set to 0 the kernel drops it and the client gets a reset at once.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def set_cork(sock: socket.socket, on: bool) -> bool:
    """TCP_CORK on or off (Linux): while on, the kernel holds what is sent until a full segment,
    the cork's removal, or 200 ms at most. False where it cannot be set."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1 if on else 0)
    except OSError:  # not a TCP socket
        return False
    return True


def send_start_with_body(send: Send, transport: asyncio.Transport) -> Send:
    """``send``, with a response's headers held in the kernel until its first body message has
    been sent too, so that both leave in one segment.

    uvicorn writes ``http.response.start`` to the socket at once, so the client would be woken
    for the headers alone and again for the first event: on loopback each send to an idle
    client costs the gateway ~0.1-0.3 ms here, on the way to every stream's first token
    (docs/benchmarks.md, "Pipeline overhead"). Every response here sends its first body message
    right after its headers (a stream starts once its first outputs are in), and the kernel lets
    corked data go after 200 ms whatever happens; a response that fails between the two is
    closed by the server, which flushes it.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return send
    corked = False

    async def send_coalesced(message: Message) -> None:
        nonlocal corked
        if message["type"] == "http.response.start":
            corked = set_cork(sock, True)
            await send(message)
            return
        try:
            await send(message)
        finally:
            if corked:
                corked = False
                set_cork(sock, False)

    return send_coalesced


class ClientConnections:
    """ASGI wrapper: bounds each client connection's kernel send buffer, puts its abort() in
    each HTTP scope's extensions, and sends each response's headers with its first body bytes.

    It must be the app the server calls (Starlette wraps ``send`` on the way in).
    Without it, or under another server, a slow client's response is still
    ended and its request aborted; only the socket lingers until the client goes.
    """

    def __init__(self, app: ASGIApp, *, send_buffer_bytes: int = 0) -> None:
        self.app = app
        self.send_buffer_bytes = send_buffer_bytes  # 0: leave the kernel's autotuning

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            transport = server_transport(send)
            if transport is not None:
                if self.send_buffer_bytes:
                    bound_send_buffer(transport, self.send_buffer_bytes)
                abort = functools.partial(reset_connection, transport)
                scope["extensions"] = {**(scope.get("extensions") or {}), ABORT_CONNECTION: abort}
                send = send_start_with_body(send, transport)
        await self.app(scope, receive, send)
