"""Stages on different hosts: Redis, the gateway, a tokenizer, the engine and a detokenizer,
each on a host of its own, talking only over the network between them.

Topology. Every host is a network namespace (``sllm-<random>-<host>``) with loopback up and
one veth link, ``eth0``, whose peer is a port of the bridge ``br0`` in a namespace of its own
(``sllm-<random>-switch``): one L2 segment, 10.231.7.0/24, and no other route, no default
route, no path to the machine's real interfaces::

    redis .2   gateway .3   tokenizer .4   engine .5   detokenizer .6   client .7
       └───────────┴────────────┴───── br0 (switch) ─────┴────────────┴──────────┘

redis-server binds 10.231.7.2:6379 only; every stage's SCALELLM_REDIS_URL is
redis://10.231.7.2:6379/0; the gateway binds 10.231.7.3. The services run under
``ip netns exec`` (the integration harness's ``command_prefix``); the test's own HTTP and
Redis clients run in threads that joined the client host's namespace (netns.Network.call_in).
The tests check that each process really runs in its host's namespace, that the hosts have
no route but the link, that nothing listens anywhere but on its host's address, that Redis
sees each stage connect from that stage's address, and that requests are served exactly
(the echo engine; the torch engine once, marked slow). Teardown stops every process and
deletes every namespace, and with them the veths and the bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from shared.model_files import resolve_model_dir
from shared.settings import CommonSettings
from tests.integration.harness import Pipeline
from tests.integration.test_echo_pipeline import echo_text, sse_events
from tests.multihost.netns import LINK, Network, ip
from tests.multihost.stages import CLIENT, HOSTS, REDIS_PORT, STAGES, Hosts

pytestmark = [pytest.mark.multihost, pytest.mark.integration, pytest.mark.usefixtures("show_logs_on_failure")]

MODEL = "SmolLM2-135M-Instruct"
TORCH_GATEWAY_PORT = 8001


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(entry.split("=", 1) for entry in raw.split("\0") if "=" in entry)


def test_each_stage_runs_on_its_own_host_and_reaches_redis_by_its_address(echo_stages: Pipeline, hosts: Hosts) -> None:
    network = hosts.network
    assert hosts.redis is not None
    processes = {service.name.split("-")[0]: service.process.pid for service in echo_stages.processes}
    processes["redis"] = hosts.redis.process.pid
    assert sorted(processes) == sorted(["redis", *STAGES])
    own = netns_inode(os.getpid())
    for host, pid in processes.items():
        assert netns_inode(pid) == network.inode(host), f"{host} does not run in its host's namespace"
        assert netns_inode(pid) != own, f"{host} runs in the test's own namespace"
    assert len({netns_inode(pid) for pid in processes.values()}) == len(processes)
    redis_url = f"redis://{network.addresses['redis']}:{REDIS_PORT}/0"
    for stage in STAGES:
        assert environment(processes[stage])["SCALELLM_REDIS_URL"] == redis_url, stage


def test_hosts_have_loopback_up_and_no_route_but_the_link(network: Network) -> None:
    for host in HOSTS:
        name = network.namespace(host)
        links = {link["ifname"]: link for link in json.loads(ip("-j", "-n", name, "link", "show"))}
        assert sorted(links) == sorted(["lo", LINK]), host
        assert "UP" in links["lo"]["flags"], f"loopback is down on {host}"
        addresses = json.loads(ip("-j", "-n", name, "-4", "addr", "show", "dev", LINK))
        assert [a["local"] for a in addresses[0]["addr_info"]] == [network.addresses[host]], host
        for family in ("-4", "-6"):
            for route in json.loads(ip("-j", "-n", name, family, "route", "show", "table", "all")):
                assert route["dst"] != "default" and "gateway" not in route, f"{host} has a route out: {route}"
                assert route.get("dev") in ("lo", LINK), f"{host} has a route not over its link: {route}"
    redis_routes = json.loads(ip("-j", "-n", network.namespace("redis"), "-4", "route", "show"))
    assert [(r["dst"], r["dev"]) for r in redis_routes] == [(network.subnet, LINK)]


def test_each_service_listens_only_on_its_hosts_address(echo_stages: Pipeline, network: Network) -> None:
    expected = {"redis": {REDIS_PORT}, "gateway": {int(echo_stages.gateway_url.rsplit(":", 1)[1])}}
    for host in HOSTS:
        listening = [line.split()[4] for line in network.run(host, "ss", "-Hlntu").splitlines() if line.strip()]
        assert all(address.rsplit(":", 1)[0] == network.addresses[host] for address in listening), (host, listening)
        assert {int(address.rsplit(":", 1)[1]) for address in listening} >= expected.get(host, set()), host
        if host not in expected:
            assert listening == [], (host, listening)


def test_requests_are_served_across_the_hosts(
    echo_stages: Pipeline, network: Network, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = [f"Request {i} crosses five hosts to reach {'cats' if i % 2 else 'dogs'}" for i in range(8)]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 6 + i, "stream": i % 2 == 0}
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        if i % 2:
            return str(response.json()["choices"][0]["text"])
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=echo_stages.gateway_url, timeout=60) as client:
            models = await client.get("/v1/models")
            assert [m["id"] for m in models.json()["data"]] == [MODEL]
            return list(await asyncio.gather(*(one(client, i) for i in range(len(prompts)))))

    texts = network.call_in(CLIENT, lambda: asyncio.run(all_at_once()))
    for i, text in enumerate(texts):
        assert text == echo_text(tokenizer, tokenizer(prompts[i])["input_ids"], 6 + i), f"request {i}"


def test_redis_sees_each_stage_connect_from_its_hosts_address(echo_stages: Pipeline, hosts: Hosts) -> None:
    network = hosts.network

    def client_list() -> list[dict[str, str]]:
        client = redis.Redis.from_url(hosts.redis_url, socket_timeout=5)
        try:
            return list(client.client_list())
        finally:
            client.close()

    connections = network.call_in(CLIENT, client_list)
    sources = {str(c["addr"]).rsplit(":", 1)[0] for c in connections}
    assert sources == {network.addresses[host] for host in (*STAGES, CLIENT)}, connections
    assert {str(c["laddr"]) for c in connections} == {f"{network.addresses['redis']}:{REDIS_PORT}"}


@pytest.mark.slow
def test_the_torch_engine_serves_a_request_across_the_hosts(hosts: Hosts) -> None:
    resolve_model_dir(CommonSettings(), weights=True)  # convert once, before the engine starts
    engine = {"engine_backend": "torch", "dtype": "float32", "kv_cache_bytes": str(256 * 1024**2)}
    pipeline = hosts.start_pipeline("torch", gateway_port=TORCH_GATEWAY_PORT, engine=engine, ready_timeout_s=300)
    try:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        response = hosts.network.call_in(
            CLIENT, lambda: httpx.post(f"{pipeline.gateway_url}/v1/completions", json=body, timeout=120)
        )
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["usage"]["completion_tokens"] == 8
        assert reply["choices"][0]["text"].strip()
    finally:
        pipeline.stop_all()
