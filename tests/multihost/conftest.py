"""tests/multihost: the pipeline's stages on different hosts, made of network namespaces.

Needs root and ``ip netns`` (iproute2, a kernel with veth and bridge); where either is
missing the tests skip and say why. A module's network and everything started on it
are removed at its end, also when a test fails or the set-up itself fails half-way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from tests.integration.harness import Pipeline
from tests.multihost import netns
from tests.multihost.stages import HOSTS, Hosts

ECHO_GATEWAY_PORT = 8000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multihost: runs the stages on different hosts (network namespaces; needs root)")


@pytest.fixture(scope="module")
def network() -> Iterator[netns.Network]:
    """redis, gateway, tokenizer, engine, detokenizer and client hosts on one bridge."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    network = netns.Network()
    try:
        network.create(HOSTS)
        yield network
    finally:
        errors = network.destroy()
        leftovers = network.leftovers()
        assert not errors and not leftovers, f"namespaces not removed: {leftovers}; errors: {errors}"


@pytest.fixture(scope="module")
def hosts(network: netns.Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Redis running on the redis host; stops whatever pipelines the tests start on it, then Redis."""
    hosts = Hosts(network, Path(tmp_path_factory.mktemp("multihost")))
    try:
        hosts.start_redis()
        yield hosts
    finally:
        hosts.stop()


@pytest.fixture(scope="module")
def echo_stages(hosts: Hosts, tokenizer: PreTrainedTokenizerBase) -> Pipeline:
    """The stages with the echo engine, each on its host (stopped with ``hosts``).

    Depends on ``tokenizer`` so the model cache exists before the services start."""
    return hosts.start_pipeline("echo", gateway_port=ECHO_GATEWAY_PORT, engine={"engine_backend": "echo"})


@pytest.fixture
def show_logs_on_failure(request: pytest.FixtureRequest, hosts: Hosts) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(hosts.logs())
