"""The API key and the Redis password never leave the process that needs them.

``scalellm up`` (every service, with their logs in one capture) runs against a Redis that requires
a password, with an API key set and DEBUG logging. The test drives every route, the error paths, and
a dropped Redis connection, then looks for either secret, as given and percent-encoded, in the
launcher's whole output, in every HTTP response (bodies and headers), and in everything stored in
Redis (heartbeats, registries, streams). /ready must not name this host while an API key is set.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis
from tests.faults.launcher import Launcher

pytestmark = pytest.mark.integration

API_KEY = "sk-scalellm-test-4f1d9a0c7e"
# More keys (SCALELLM_API_KEYS), each as secret as the first.
OTHER_KEYS = ["sk-scalellm-second-93b2", "sk-scalellm-third-0d7e"]
# Characters that must be percent-encoded in a URL, so both spellings are looked for.
REDIS_PASSWORD = "redis-pw/7c:e@41"
SECRETS = [API_KEY, *OTHER_KEYS, REDIS_PASSWORD, quote(REDIS_PASSWORD, safe="")]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def launcher(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[Launcher, str]]:
    """``scalellm up --backend echo`` against a password-protected Redis; stopped after the test."""
    with EmbeddedRedis(tmp_path / "redis", password=REDIS_PASSWORD) as server:
        up = Launcher(
            tmp_path / "up.log",
            "--backend",
            "echo",
            "--tokenizers",
            "1",
            "--detokenizers",
            "1",
            redis_url=server.url,
            api_key=API_KEY,
            api_keys=",".join(OTHER_KEYS),
            log_level="DEBUG",
            stream_prefix="secrets",
        )
        try:
            up.wait_for(r"^ready: ", timeout=120)
            yield up, server.url
        finally:
            up.stop()


def exercise(url: str) -> list[httpx.Response]:
    """Every route, authorized or not, and the error paths a client can reach."""
    completion = {"prompt": "Hello world", "max_tokens": 2}
    with httpx.Client(base_url=url, timeout=30) as http:
        replies = [
            http.get("/ready"),
            http.get("/metrics"),
            http.get("/openapi.json"),
            http.get("/v1/models"),
            http.get("/v1/models", headers={"Authorization": "Bearer wrong-key"}),
            http.get("/v1/models", headers=AUTH),
            http.get("/v1/models/nope", headers=AUTH),
            http.post("/v1/completions", json=completion),
            http.post("/v1/completions", json=completion, headers={"Authorization": f"Basic {API_KEY}"}),
            http.post("/v1/completions", json=completion, headers=AUTH),
            http.post("/v1/completions", json=completion | {"stream": True}, headers=AUTH),
            http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=AUTH),
            http.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**6}, headers=AUTH),  # tokenizer 400
            http.post("/v1/completions", content=b"{not json", headers=AUTH),
            http.request("TRACE", "/health"),
            http.get("/nowhere"),
            http.get("/health"),
            http.get("/version"),
            http.post("/tokenize", json={"prompt": "Hi"}),
            http.post("/tokenize", json={"prompt": "Hi"}, headers={"Authorization": f"Bearer {OTHER_KEYS[1]}"}),
            http.post("/detokenize", json={"tokens": [1, 2]}, headers={"Authorization": f"Bearer {OTHER_KEYS[0]}"}),
        ]
    statuses = [r.status_code for r in replies]
    expected = [200, 200, 200, 401, 401, 200, 404, 401, 401, 200, 200, 200, 400, 400, 405, 404, 200, 200, 401, 200, 200]
    assert statuses == expected, statuses
    return replies


def wait_healthy(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the pipeline did not recover from the dropped connections"
        time.sleep(0.1)


def stored_values(client: redis.Redis) -> Iterator[bytes]:
    """Every key and value in Redis: strings, hashes, streams."""
    for key in client.scan_iter(count=500):
        yield key
        kind = client.type(key)
        if kind == b"string":
            yield client.get(key) or b""
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                yield field + b"=" + value
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                yield b"".join(name + b"=" + value for name, value in fields.items())


def test_no_secret_in_logs_responses_heartbeats_or_redis(launcher: tuple[Launcher, str]) -> None:
    up, redis_url = launcher
    replies = exercise(up.url)
    client = redis.Redis.from_url(redis_url)
    try:
        # Every service loses its connections once: the paths that log Redis errors run too.
        client.client_kill_filter(_type="normal", skipme=True)
        wait_healthy(up.url)
        replies += exercise(up.url)
        stored = list(stored_values(client))
        assert any(b":heartbeat:engine:" in value for value in stored)  # the scan did see the heartbeats
    finally:
        client.close()
    up.stop()
    output = up.log()

    assert "using Redis at redis://:***@127.0.0.1:" in output, output[:2000]
    for secret in SECRETS:
        assert secret not in output, f"{secret!r} in the launcher's output"
        for reply in replies:
            assert secret not in reply.text and secret not in str(reply.headers), reply.request.url
        assert not [value for value in stored if secret.encode() in value], f"{secret!r} stored in Redis"
    health = replies[0]
    assert "gateway_id" not in health.json() and socket.gethostname() not in health.text
