"""shared/redis_client.HeldConnections: stream reads and publishes past redis-py's pool, and how
a connection whose reply may be unread is never used again."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared.messages import AbortRequests
from shared.redis_client import HeldConnections, held_connections, stream_reply
from shared.transport import Ack, StreamTransport


class FakeConnection:
    """Replies with what the test queues; a reply that is an Event is waited for (a blocked read)."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.sent: list[tuple[Any, ...]] = []
        self.disconnected = False

    async def send_command(self, *args: Any) -> None:
        self.sent.append(args)

    def pack_commands(self, commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return list(commands)

    async def send_packed_command(self, packed: list[tuple[Any, ...]]) -> None:
        self.sent += packed

    async def read_response(self) -> Any:
        reply = self.replies.pop(0)
        if isinstance(reply, asyncio.Event):
            await reply.wait()
            return None
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def disconnect(self, nowait: bool = False) -> None:
        self.disconnected = True


class FakePool:
    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.made: list[FakeConnection] = []
        self.released: list[FakeConnection] = []

    async def get_connection(self) -> FakeConnection:
        self.made.append(FakeConnection(self.replies))
        return self.made[-1]

    async def release(self, connection: FakeConnection) -> None:
        self.released.append(connection)


class FakeClient:
    def __init__(self, replies: list[Any]) -> None:
        self.connection_pool = FakePool(replies)


def held(replies: list[Any]) -> tuple[HeldConnections, FakePool]:
    client = FakeClient(replies)
    return HeldConnections(client), client.connection_pool  # type: ignore[arg-type]


def test_a_connection_is_kept_and_reused_across_commands() -> None:
    async def scenario() -> None:
        connections, pool = held(["a", "b"])
        assert await connections.command("PING") == "a"
        assert await connections.command("PING") == "b"
        assert len(pool.made) == 1 and pool.released == []
        await connections.close()
        assert pool.released == pool.made

    asyncio.run(scenario())


def test_concurrent_commands_get_connections_of_their_own() -> None:
    async def scenario() -> None:
        blocked = asyncio.Event()
        connections, pool = held([blocked, "quick"])
        waiting = asyncio.create_task(connections.command("XREAD", "BLOCK", 500))
        await asyncio.sleep(0)
        assert await connections.command("PING") == "quick"  # not queued behind the blocked read
        assert len(pool.made) == 2
        blocked.set()
        assert await waiting is None

    asyncio.run(scenario())


def test_a_cancelled_read_drops_its_connection() -> None:
    async def scenario() -> None:
        connections, pool = held([asyncio.Event(), "next"])
        read = asyncio.create_task(connections.command("XREADGROUP", "BLOCK", 500))
        await asyncio.sleep(0)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        # Its reply may still come: that connection goes back disconnected, and is not used again.
        first = pool.made[0]
        assert first.disconnected and pool.released == [first]
        assert await connections.command("PING") == "next"
        assert pool.made[1] is not first

    asyncio.run(scenario())


def test_a_lost_connection_is_dropped_and_an_error_reply_is_not() -> None:
    async def scenario() -> None:
        connections, pool = held([RedisConnectionError("gone"), ResponseError("NOGROUP"), "ok"])
        with pytest.raises(RedisConnectionError):
            await connections.command("XREAD")
        assert pool.made[0].disconnected
        with pytest.raises(ResponseError):
            await connections.command("XREADGROUP")
        assert await connections.command("PING") == "ok"
        assert len(pool.made) == 2 and not pool.made[1].disconnected  # the error reply was read whole

    asyncio.run(scenario())


def test_a_pipeline_reads_every_reply_before_raising_the_first_error() -> None:
    async def scenario() -> None:
        connections, pool = held([b"1-0", ResponseError("WRONGTYPE"), 1, "after"])
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await connections.pipeline([("XADD", "s", "*", "m", b"x"), ("XADD", "k", "*", "m", b"y"), ("XACK",)])
        assert await connections.command("PING") == "after"  # the replies were all read: in step
        assert len(pool.made) == 1

    asyncio.run(scenario())


def test_stream_replies_parse_from_both_protocols() -> None:
    resp2 = [[b"s", [[b"1-0", [b"m", b"x", b"other", b"y"]], [b"2-0", None]]]]
    resp3 = {b"s": [[b"1-0", [b"m", b"x", b"other", b"y"]], [b"2-0", None]]}
    expected = [(b"s", [(b"1-0", {b"m": b"x", b"other": b"y"}), (b"2-0", None)])]
    assert stream_reply(resp2) == expected
    assert stream_reply(resp3) == expected
    assert stream_reply(None) == []


def test_the_transport_reads_and_publishes_on_held_connections() -> None:
    async def scenario() -> None:
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        transport = StreamTransport.from_client(client, "t", "worker")
        assert held_connections(client) is not None
        stream = transport.names.requests
        await transport.publish([(stream, AbortRequests(request_ids=["r1"]))])
        [delivery] = await transport.read_group([stream], "g", count=10, block_ms=0)
        await transport.publish(
            [(transport.names.aborts, delivery.message)], acks=[Ack(stream, "g", delivery.entry_id)]
        )
        _, [out] = await transport.read_stream(transport.names.aborts, "0", count=10, block_ms=0)
        assert out.message == AbortRequests(request_ids=["r1"])
        assert (await client.xpending(stream, "g"))["pending"] == 0
        await transport.close()

    asyncio.run(scenario())
