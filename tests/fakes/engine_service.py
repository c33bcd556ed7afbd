"""The engine service run in-process for tests: echo backend (or any given), fakeredis, the real I/O thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fakeredis

from services.engine.contract import EngineBackend
from services.engine.echo import EchoBackend
from services.engine.service import EngineService
from shared.messages import (
    AbortRequests,
    DetokenizeParams,
    EngineStepOutput,
    Message,
    RequestFailed,
    SamplingParams,
    TokenDelta,
    TokenizedRequest,
    decode,
    encode,
)
from shared.settings import EngineSettings
from shared.transport import PAYLOAD_FIELD, StreamNames, StreamTransport

PREFIX = "t"
NAMES = StreamNames(PREFIX)
SHARDS = 2


def wait_for(condition: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def tokenized_request(
    request_id: str, prompt: list[int], *, deadline: float | None = None, **sampling: object
) -> TokenizedRequest:
    return TokenizedRequest(
        request_id=request_id,
        gateway_id="gw",
        deadline=time.time() + 60 if deadline is None else deadline,
        prompt_token_ids=prompt,
        sampling=SamplingParams(**sampling),
        detokenize=DetokenizeParams(),
    )


@dataclass
class RunningEngine:
    service: EngineService
    redis: fakeredis.FakeRedis
    thread: threading.Thread
    exit_codes: list[int] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> int:
        self.service.request_stop()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the engine did not stop")
        return self.exit_codes[0]

    def submit(self, request_id: str, prompt: list[int], *, deadline: float | None = None, **sampling: object) -> str:
        message = tokenized_request(request_id, prompt, deadline=deadline, **sampling)
        return self.redis.xadd(NAMES.tokenized, {PAYLOAD_FIELD: encode(message)}).decode()

    def abort(self, *request_ids: str) -> None:
        self.redis.xadd(NAMES.aborts, {PAYLOAD_FIELD: encode(AbortRequests(request_ids=list(request_ids)))})

    def messages(self, stream: str) -> list[Message]:
        return [decode(fields[PAYLOAD_FIELD]) for _, fields in self.redis.xrange(stream)]

    def deltas(self) -> dict[str, list[TokenDelta]]:
        found: dict[str, list[TokenDelta]] = {}
        for shard in range(SHARDS):
            for message in self.messages(NAMES.generated(shard)):
                assert isinstance(message, EngineStepOutput)
                for delta in message.deltas:
                    found.setdefault(delta.request_id, []).append(delta)
        return found

    def finished(self, request_id: str) -> bool:
        deltas = self.deltas().get(request_id, [])
        return bool(deltas) and deltas[-1].finish_reason is not None

    def failures(self) -> list[RequestFailed]:
        return [m for m in self.messages(NAMES.responses("gw")) if isinstance(m, RequestFailed)]

    def pending(self) -> int:
        return int(self.redis.xpending(NAMES.tokenized, NAMES.engine_group)["pending"])


def engine_starter() -> Iterator[Callable[..., RunningEngine]]:
    """Yields ``start(backend=None, before=None, **settings)``, which runs an engine service on its own
    thread against a fresh fakeredis; every engine still running is stopped when the generator resumes.
    The ``start_engine`` fixture (tests/unit/conftest.py) wraps it."""
    engines: list[RunningEngine] = []

    def start(
        backend: EngineBackend | None = None,
        before: Callable[[fakeredis.FakeRedis], None] | None = None,
        **overrides: object,
    ) -> RunningEngine:
        """``before`` prepares Redis before the engine starts."""
        server = fakeredis.FakeServer()
        redis = fakeredis.FakeRedis(server=server)
        if before is not None:
            before(redis)
        settings = EngineSettings(
            **{
                "echo_step_delay_ms": 2.0,
                "detokenizer_shards": SHARDS,
                "heartbeat_interval_s": 0.1,
                "stream_prefix": PREFIX,
                "drain_timeout_s": 1.0,
                **overrides,
            }
        )
        backend = backend or EchoBackend.from_settings(settings)
        service = EngineService(
            settings,
            backend,
            lambda: StreamTransport.from_client(fakeredis.FakeAsyncRedis(server=server), PREFIX, "engine-test"),
            engine_id="engine-test",
        )
        exit_codes: list[int] = []
        thread = threading.Thread(target=lambda: exit_codes.append(service.run()), daemon=True)
        engine = RunningEngine(service, redis, thread, exit_codes)
        thread.start()
        engines.append(engine)
        wait_for(lambda: engine.redis.exists(NAMES.heartbeat("engine", "engine-test")), what="first heartbeat")
        return engine

    yield start
    for engine in engines:
        if engine.thread.is_alive():
            engine.stop()


def tokens_of(deltas: list[TokenDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]
