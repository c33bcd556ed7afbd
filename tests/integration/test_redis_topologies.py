"""The echo pipeline on a real 3-master Redis Cluster and behind a real Sentinel (shared/redis_client.py).

On the cluster every key the pipeline writes must hash to one slot (the stream prefix made a
hash tag): the Lua scripts, the heartbeat and the multi-stream reads touch several keys at once,
which a cluster refuses across slots (CROSSSLOT). Behind Sentinel the services find the master by
asking the sentinel, with the master's password from the URL and the sentinel's own from
``?sentinel_password=``; neither may appear in a log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from services.launcher import health
from shared.fencing import StateExists
from shared.messages import AbortRequests, Heartbeat
from shared.output_checkpoints import OutputCheckpoint
from shared.redis_client import hash_tag
from shared.settings import CommonSettings
from shared.transport import Ack, StreamTransport
from tests.integration.harness import Pipeline
from tests.integration.redis_topologies import LocalCluster, LocalSentinel, local_cluster, local_sentinel

pytestmark = pytest.mark.integration

PREFIX = "topo"
CLUSTER_PASSWORD = "cluster-pw-5b1e"
MASTER_PASSWORD = "master-pw-93d0"
SENTINEL_PASSWORD = "sentinel-pw-2a7c"
GROUP = "workers"


def start_pipeline(url: str, log_dir: Path) -> Pipeline:
    """One replica of each role (echo engine), ready to serve."""
    pipeline = Pipeline(url, log_dir, env={"SCALELLM_STREAM_PREFIX": PREFIX})
    pipeline.start("tokenizer")
    pipeline.start("engine", engine_backend="echo", echo_step_delay_ms="2")
    pipeline.start("detokenizer")
    pipeline.start_gateway(request_timeout_s="30")
    return pipeline


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(3, password=CLUSTER_PASSWORD) as started:
        yield started


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    with local_sentinel(master_password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD) as started:
        yield started


@pytest.fixture(scope="module")
def pipelines(
    cluster: LocalCluster,
    sentinel: LocalSentinel,
    tmp_path_factory: pytest.TempPathFactory,
    tokenizer: PreTrainedTokenizerBase,
) -> Iterator[tuple[Pipeline, Pipeline]]:
    """(on the cluster, behind the sentinel), started together: their start-up (imports, the
    tokenizer) is most of this module's time. ``tokenizer``: the model cache exists first."""
    started: list[Pipeline] = []
    try:
        started.append(start_pipeline(cluster.url, tmp_path_factory.mktemp("cluster-logs")))
        started.append(start_pipeline(sentinel.url, tmp_path_factory.mktemp("sentinel-logs")))
        for pipeline in started:
            pipeline.wait_ready()
        yield started[0], started[1]
    except BaseException:
        for pipeline in started:
            print(pipeline.logs())
        raise
    finally:
        # SIGTERM to every service first, so that they drain side by side, then wait for each.
        for service in [service for pipeline in started for service in pipeline.processes]:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for pipeline in started:
            pipeline.stop_all()


def complete(pipeline: Pipeline, prompt: str, *, stream: bool) -> str:
    """The text of a completion, streamed (SSE, ending in [DONE]) or not."""
    body = {"prompt": prompt, "max_tokens": 16, "stream": stream}
    response = httpx.post(f"{pipeline.gateway_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    if not stream:
        return str(response.json()["choices"][0]["text"])
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2, events
    return "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])


def echo_text(tokenizer: PreTrainedTokenizerBase, prompt: str, max_tokens: int = 16) -> str:
    ids = list(tokenizer(prompt)["input_ids"])
    return str(tokenizer.decode((ids * (max_tokens // len(ids) + 1))[:max_tokens], skip_special_tokens=True))


def test_cluster_serves_plain_and_streamed_requests(
    pipelines: tuple[Pipeline, Pipeline], tokenizer: PreTrainedTokenizerBase
) -> None:
    pipeline = pipelines[0]
    for prompt, stream in [("Hello cluster", False), ("Streaming over slots", True), ("Again, plain", False)]:
        assert complete(pipeline, prompt, stream=stream) == echo_text(tokenizer, prompt)


def test_cluster_keys_share_one_slot_on_one_node(cluster: LocalCluster, pipelines: tuple[Pipeline, Pipeline]) -> None:
    pipeline = pipelines[0]
    complete(pipeline, "one more, so every kind of key exists", stream=False)
    per_node: dict[int, list[bytes]] = {}
    for node in cluster.nodes:
        with node.client() as client:
            per_node[node.port] = list(client.scan_iter(count=1000))
    # Only this pipeline's (test_every_transport_operation_works_on_the_cluster's have a prefix of their own).
    per_node = {port: [key for key in found if not key.startswith(b"{transport}:")] for port, found in per_node.items()}
    keys = [key for found in per_node.values() for key in found]
    assert keys and all(key.startswith(b"{topo}:") for key in keys), keys
    assert sum(bool(found) for found in per_node.values()) == 1, {port: len(found) for port, found in per_node.items()}
    with redis.RedisCluster.from_url(f"redis://:{CLUSTER_PASSWORD}@127.0.0.1:{cluster.nodes[0].port}") as client:
        assert {client.keyslot(key) for key in keys} == {client.keyslot(b"topo")}
    assert {hash_tag(key.decode()) for key in keys} == {PREFIX}
    kinds = {key.decode().split(":")[1] for key in keys}
    assert {"requests", "tokenized", "generated", "responses", "heartbeat", "replicas", "lease"} <= kinds, kinds


def test_sentinel_serves_requests(
    sentinel: LocalSentinel, pipelines: tuple[Pipeline, Pipeline], tokenizer: PreTrainedTokenizerBase
) -> None:
    pipeline = pipelines[1]
    assert complete(pipeline, "Hello sentinel", stream=False) == echo_text(tokenizer, "Hello sentinel")
    assert complete(pipeline, "Streamed via sentinel", stream=True) == echo_text(tokenizer, "Streamed via sentinel")
    with redis.Redis.from_url(sentinel.master.url) as master:  # straight to the master, not via the sentinel
        assert master.exists(f"{PREFIX}:requests")  # one server: the prefix is kept as it is


@pytest.mark.parametrize("which", ["cluster", "sentinel"])
def test_health_check_reads_both_topologies(
    cluster: LocalCluster, sentinel: LocalSentinel, pipelines: tuple[Pipeline, Pipeline], which: str
) -> None:
    url = cluster.url if which == "cluster" else sentinel.url
    healthy, line = health.check("engine", CommonSettings(redis_url=url, stream_prefix=PREFIX))
    assert healthy, line


def test_no_password_in_any_log(pipelines: tuple[Pipeline, Pipeline]) -> None:
    logs = "".join(service.log() for pipeline in pipelines for service in pipeline.processes)
    assert "ready" in logs
    for secret in (CLUSTER_PASSWORD, MASTER_PASSWORD, SENTINEL_PASSWORD):
        assert secret not in logs


def abort(i: int) -> AbortRequests:
    return AbortRequests(request_ids=[f"r{i}"])


def test_every_transport_operation_works_on_the_cluster(cluster: LocalCluster) -> None:
    """Each script, multi-key command and pipeline of shared/ on the cluster: none is refused
    (CROSSSLOT, a script's key on another node), and every key lands in the prefix's one slot.
    A prefix of its own, so a slot that may live on another node than the pipeline's."""

    async def scenario() -> None:
        a = StreamTransport(cluster.url, "transport", "a")
        b = StreamTransport(cluster.url, "transport", "b")
        strict = StreamTransport(cluster.url, "transport", "strict", max_deliveries=1)
        names = a.names
        shards = [names.generated(0), names.generated(1)]
        try:
            assert names.prefix == "{transport}"
            # One pipeline of XADDs to two streams, then one XREADGROUP over both.
            await a.publish([(stream, abort(i)) for i, stream in enumerate(shards)])
            read = await a.read_group(shards, GROUP, count=10, block_ms=100)
            assert sorted(d.message.request_ids[0] for d in read if isinstance(d.message, AbortRequests)) == [
                "r0",
                "r1",
            ]
            # Heartbeat script, SCAN + MGET, registry; then a stops beating and b takes its entry over.
            beat = Heartbeat(role="engine", replica_id="a", time=time.time())
            assert not (await a.beat(beat, ttl_s=0.3)).renewed and (await a.beat(beat, ttl_s=0.3)).renewed
            assert [h.replica_id for h in await b.live_replicas("engine")] == ["a"]
            await asyncio.sleep(0.4)
            assert "a" in (await b.replica_census("engine")).gone
            # The reap script: marks only a replica still without a heartbeat; its next beat reads the mark.
            assert await b.reap("engine", ["a"], keep_s=10) == ["a"]
            assert (await a.beat(beat, ttl_s=0.3)).reaped and await b.reap("engine", ["a"], keep_s=10) == []
            await asyncio.sleep(0.4)
            taken = await b.take_over(shards[0], GROUP, "a", count=10, min_idle_ms=0)
            assert [d.message for d in taken.deliveries] == [abort(0)]
            # A claim past max_deliveries dead-letters the entry (pipelined XPENDINGs, then XADD + XACK).
            assert await strict.claim_stale(shards[1], GROUP, min_idle_ms=0) == []
            _, parked = await a.read_stream(names.deadletter, "0-0", count=10, block_ms=0)
            assert [d.message for d in parked] == [abort(1)]
            # The engine's owned publish with output checkpoints, and its touch script.
            await a.publish([(names.tokenized, abort(2))])
            [work] = await b.read_group([names.tokenized], "engines", count=1, block_ms=100)
            reply = names.responses("gw")
            step = [(reply, abort(3))]
            checkpoint = OutputCheckpoint("q", 0, (1, 2, 3))
            assert (
                await b.publish_owned(names.tokenized, "engines", step, owned=[work.entry_id], checkpoints=[checkpoint])
                == []
            )
            assert await a.publish_owned(names.tokenized, "engines", step, owned=[work.entry_id]) == [work.entry_id]
            assert await b.read_output_checkpoints(["q"]) == [[1, 2, 3]]
            assert await b.touch_owned(names.tokenized, "engines", [work.entry_id]) == []
            await b.touch(names.tokenized, "engines", [work.entry_id])
            done = OutputCheckpoint("q", 3, (), done=True)
            ack = Ack(names.tokenized, "engines", work.entry_id)
            assert (
                await b.publish_owned(
                    names.tokenized, "engines", [], owned=[work.entry_id], checkpoints=[done], acks=[ack]
                )
                == []
            )
            # Leases and the detokenizer's fenced publish.
            assert await a.acquire_lease("generated:0", 1000) and not await b.acquire_lease("generated:0", 1000)
            assert await a.renew_lease("generated:0", 1000)
            state = (names.decode_state("q"), abort(4), 10_000)
            assert await a.publish_fenced(
                step, leases=["generated:0"], lease_ttl_ms=1000, states=[state], absent=[names.decode_state("q")]
            )
            with pytest.raises(StateExists):  # a request taken for new whose checkpoint exists
                await a.publish_fenced(
                    step, leases=["generated:0"], lease_ttl_ms=1000, absent=[names.decode_state("q")]
                )
            assert not await b.publish_fenced(step, leases=["generated:0"], lease_ttl_ms=1000)
            assert await b.lease_holders(["generated:0", "generated:1"]) == ["a", None]
            assert await b.read_states([names.decode_state("q")]) == [abort(4)]
            await a.release_lease("generated:0")
            await a.publish([(shards[1], abort(5))])
            await a.read_group([shards[1]], GROUP, count=10, block_ms=100)
            assert [d.message for d in await b.claim_all_pending(shards[1], GROUP, count=10)] == [abort(5)]
            # Trimming by progress (pipelined XINFO + XLEN, XPENDING, XTRIM) and the backlog.
            assert await a.backlog([names.tokenized]) == 0
            _, replies = await a.read_stream(reply, "0-0", count=10, block_ms=0)
            assert [d.message for d in replies] == [abort(3), abort(3)]
            await a.expire(reply, 60)
            await a.delete(reply, names.decode_state("q"))
        finally:
            for transport in (a, b, strict):
                await transport.close()

    asyncio.run(scenario())
    with redis.RedisCluster.from_url(f"redis://:{CLUSTER_PASSWORD}@127.0.0.1:{cluster.nodes[0].port}") as client:
        keys = list(client.scan_iter(match="{transport}:*", count=1000))
        assert len(keys) == 5 and {client.keyslot(key) for key in keys} == {client.keyslot("transport")}
