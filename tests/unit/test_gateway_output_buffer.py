"""A request's output buffer and the slow-client monitor: pure logic, a fake clock, no I/O."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from services.gateway.output_buffer import OutputBuffer, event_size
from services.gateway.slow_clients import ABORT_CONNECTION, ClientConnections, SlowClientMonitor
from shared.messages import RequestFailed, TextDelta, Usage


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def delta(text: str, ids: list[int], finish: str | None = None, **kw: Any) -> TextDelta:
    return TextDelta(request_id="r", text=text, token_ids=ids, finish_reason=finish, **kw)


def failure() -> RequestFailed:
    return RequestFailed(request_id="r", status=500, error_type="server_error", message="engine crashed")


def test_a_lone_delta_comes_out_unchanged() -> None:
    buffer = OutputBuffer("r")
    sent = delta("Hel", [1], offset=0)
    assert buffer.put(sent) and len(buffer) == 1
    assert buffer.take() is sent
    assert buffer.take() is None and buffer.empty() and buffer.pending_bytes == 0


def test_waiting_deltas_are_coalesced_into_one_without_losing_anything() -> None:
    buffer = OutputBuffer("r")
    first_hops = {"engine_first_token": 1.0}
    buffer.put(delta("Hel", [1], offset=3, logprobs=[(-0.1, [(1, -0.1)])], timeline=first_hops))
    buffer.put(delta("", [2]))  # a token with no text yet (half a character)
    buffer.put(delta("lo ", [3, 4], offset=6, logprobs=[(-0.2, [(3, -0.2)]), (-0.3, [])]))
    usage = Usage(prompt_tokens=2, completion_tokens=4)
    buffer.put(delta("wörld", [5], "stop", usage=usage, timeline={"engine_finished": 2.0}))
    assert len(buffer) == 1
    merged = buffer.take()
    assert isinstance(merged, TextDelta)
    assert merged.text == "Hello wörld" and merged.token_ids == [1, 2, 3, 4, 5]
    assert merged.logprobs == [(-0.1, [(1, -0.1)]), (-0.2, [(3, -0.2)]), (-0.3, [])]
    assert merged.offset == 3  # where the first one began
    assert merged.finish_reason == "stop" and merged.usage == usage
    assert merged.timeline == {"engine_first_token": 1.0, "engine_finished": 2.0}
    assert buffer.pending_bytes == 0 and buffer.pending_since is None


def test_order_is_kept_around_a_failure_and_after_the_final_delta() -> None:
    buffer = OutputBuffer("r")
    buffer.put(delta("a", [1]))
    buffer.put(failure())
    buffer.put(delta("late", [2]))  # nothing joins text across a failure
    events = [buffer.take(), buffer.take(), buffer.take()]
    assert [type(e).__name__ for e in events] == ["TextDelta", "RequestFailed", "TextDelta"]
    buffer.put(delta("end", [3], "length"))
    buffer.put(delta("after", [4]))  # a final delta is never extended
    first, second = buffer.take(), buffer.take()
    assert isinstance(first, TextDelta) and first.text == "end" and first.finish_reason == "length"
    assert isinstance(second, TextDelta) and second.text == "after"
    buffer.put(delta("text", [5]))
    buffer.put(delta("", [], "error"))  # kept apart: the text before it still reaches the client
    texts = [buffer.take(), buffer.take()]
    assert [(e.text, e.finish_reason) for e in texts if isinstance(e, TextDelta)] == [("text", None), ("", "error")]


def test_pending_bytes_follow_puts_and_takes() -> None:
    buffer = OutputBuffer("r")
    buffer.put(delta("x" * 100, [1]))
    buffer.put(failure())
    sizes = event_size(delta("x" * 100, [1])) + event_size(failure())
    assert buffer.pending_bytes == sizes == buffer.peak_bytes
    buffer.take()
    assert buffer.pending_bytes == event_size(failure())
    buffer.take()
    assert buffer.pending_bytes == 0 and buffer.peak_bytes == sizes


def test_sizes_grow_with_text_tokens_and_logprobs() -> None:
    short, long = event_size(delta("a", [1])), event_size(delta("a" * 1000, [1]))
    assert long - short >= 999
    assert event_size(delta("ж" * 1000, [1])) > long  # two bytes a character in memory
    assert event_size(delta("a", [1, 2, 3])) > short
    assert event_size(delta("a", [1], logprobs=[(-0.1, [(1, -0.1), (2, -0.2)])])) > short


def test_past_its_bound_a_buffer_drops_what_it_holds_and_ends_the_request() -> None:
    overflows: list[str] = []
    buffer = OutputBuffer("r", max_bytes=64 * 1024, on_overflow=lambda: overflows.append("r"))
    accepted = 0
    for i in range(100_000):  # a stalled reader never takes; the producer never waits
        if not buffer.put(delta("token ", [i])):
            break
        accepted += 1
    assert overflows == ["r"] and buffer.overflowed
    assert 64 * 1024 < buffer.peak_bytes <= 64 * 1024 + event_size(delta("token ", [0]))
    assert accepted < 2000 and buffer.pending_bytes == 0  # the memory is freed at once
    assert not buffer.put(delta("more", [1])) and overflows == ["r"]  # refused, reported once
    ended = buffer.take()
    assert isinstance(ended, RequestFailed) and "too slowly" in ended.message
    assert isinstance(buffer.take(), RequestFailed)  # and stays ended


def test_an_unbounded_buffer_never_overflows() -> None:
    buffer = OutputBuffer("r")
    for i in range(10_000):
        assert buffer.put(delta("token ", [i]))
    merged = buffer.take()
    assert isinstance(merged, TextDelta) and len(merged.token_ids) == 10_000
    with pytest.raises(ValueError):
        OutputBuffer("r", max_bytes=0)


def test_stalled_for_counts_from_the_last_take_while_output_waits() -> None:
    clock = FakeClock()
    buffer = OutputBuffer("r", clock=clock)
    clock.now = 5.0
    assert buffer.stalled_for(clock.now) == 0.0  # nothing waits: a slow model, not a slow client
    buffer.put(delta("a", [1]))
    buffer.put(failure())
    clock.now = 9.0
    assert buffer.stalled_for(clock.now) == 4.0
    buffer.take()  # the reader made progress; more still waits
    assert buffer.stalled_for(clock.now) == 0.0
    clock.now = 10.5
    assert buffer.stalled_for(clock.now) == 1.5
    buffer.take()
    assert buffer.stalled_for(clock.now) == 0.0


def test_get_waits_for_a_put_and_sees_an_overflow() -> None:
    async def scenario() -> None:
        buffer = OutputBuffer("r", max_bytes=1000)
        waiter = asyncio.create_task(buffer.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        buffer.put(delta("hi", [1]))
        got = await asyncio.wait_for(waiter, 1)
        assert isinstance(got, TextDelta) and got.text == "hi"
        waiter = asyncio.create_task(buffer.get())
        await asyncio.sleep(0)
        buffer.put(delta("x" * 2000, [2]))
        assert isinstance(await asyncio.wait_for(waiter, 1), RequestFailed)

    asyncio.run(scenario())


# -- the monitor -----------------------------------------------------------------------


def test_the_monitor_reports_a_reader_that_left_output_untaken_for_the_timeout() -> None:
    clock = FakeClock()
    monitor = SlowClientMonitor(timeout_s=2.0, clock=clock)
    assert monitor.interval_s == 0.5
    slow: list[tuple[str, str]] = []
    buffers = {rid: OutputBuffer(rid, clock=clock) for rid in ("stalled", "reading", "waiting")}
    for rid, buffer in buffers.items():
        monitor.watch(rid, buffer, lambda reason, rid=rid: slow.append((rid, reason)))
    buffers["stalled"].put(delta("a", [1]))
    buffers["reading"].put(delta("a", [1]))
    clock.now = 1.5
    buffers["reading"].take()
    buffers["reading"].put(delta("b", [2]))
    assert monitor.sweep() == []
    clock.now = 2.0
    assert monitor.sweep() == ["stalled"] and slow == [("stalled", "timeout")]
    clock.now = 100.0  # "waiting" has nothing pending; "stalled" is reported once only
    assert monitor.sweep() == ["reading"] and len(monitor) == 1


def test_the_monitor_reports_an_overflow_at_once_and_forgets_unwatched_requests() -> None:
    monitor = SlowClientMonitor(timeout_s=60.0)
    assert monitor.interval_s == 1.0
    slow: list[str] = []
    watched, released = OutputBuffer("a", max_bytes=500), OutputBuffer("b", max_bytes=500)
    monitor.watch("a", watched, slow.append)
    monitor.watch("b", released, slow.append)
    monitor.unwatch("b")
    watched.put(delta("x" * 1000, [1]))
    released.put(delta("x" * 1000, [1]))
    assert slow == ["buffer"] and len(monitor) == 0
    with pytest.raises(ValueError):
        SlowClientMonitor(timeout_s=0)


def test_client_connections_find_the_transport_behind_the_servers_send_and_bound_its_buffer() -> None:
    aborted: list[bool] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    class Transport(asyncio.Transport):
        def abort(self) -> None:
            aborted.append(True)

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return sock if name == "socket" else default

    class Cycle:  # the shape of uvicorn's RequestResponseCycle
        transport = Transport()

        async def send(self, message: Any) -> None:
            return None

    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope.get("extensions", {}).get(ABORT_CONNECTION))

    async def plain_send(message: Any) -> None:
        return None

    async def scenario() -> None:
        wrapped = ClientConnections(app, send_buffer_bytes=32 * 1024)
        await wrapped({"type": "http"}, plain_send, Cycle().send)
        await wrapped({"type": "http", "extensions": {"other": {}}}, plain_send, plain_send)
        await wrapped({"type": "lifespan"}, plain_send, Cycle().send)

    try:
        asyncio.run(scenario())
        assert seen[1] is None and seen[2] is None
        seen[0]()
        assert aborted == [True]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 64 * 1024  # Linux doubles it
        # A reset, not a close that would keep delivering to a client that does not read.
        assert struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
    finally:
        sock.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")
def test_a_responses_headers_wait_in_the_kernel_until_its_first_body_bytes_are_sent_too() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    corked: list[tuple[str, int]] = []  # each message the server was given, with the cork at that moment

    class Transport(asyncio.Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return sock if name == "socket" else default

    class Cycle:  # the shape of uvicorn's RequestResponseCycle
        transport = Transport()

        async def send(self, message: Any) -> None:
            if message.get("body") == b"boom":
                raise OSError("the client went away")
            corked.append((message["type"], sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)))

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def fails(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"boom"})

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    try:
        asyncio.run(ClientConnections(stream)({"type": "http"}, receive, Cycle().send))
        assert [(kind, bool(on)) for kind, on in corked] == [
            ("http.response.start", True),  # held in the kernel...
            ("http.response.body", True),  # ...until the first event joins it
            ("http.response.body", False),
        ]
        with pytest.raises(OSError):
            asyncio.run(ClientConnections(fails)({"type": "http"}, receive, Cycle().send))
        assert not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)  # released on a failed send too
    finally:
        sock.close()


def test_the_prompts_names_on_a_first_delta_do_not_count_against_the_bound() -> None:
    buffer = OutputBuffer("r", max_bytes=10_000)
    # A long echoed prompt with 20 alternatives a token: far more than the bound, once, at the start.
    prompt = [(7, " word", i * 5, -1.0, 3, [(8, " other", -2.0)] * 20) for i in range(2000)]
    assert buffer.put(TextDelta(request_id="r", text="", offset=0, prompt_logprobs=prompt, prompt_text="x" * 10_000))
    taken = buffer.take()
    assert isinstance(taken, TextDelta) and taken.prompt_logprobs == prompt and not buffer.overflowed
