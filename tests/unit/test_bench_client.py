"""scalellm bench's HTTP side against an in-process server (httpx.MockTransport): request bodies,
streams read as OpenAI-compatible servers send them, failures counted, the concurrency limit and
arrival times honoured, warm-ups not counted; the progress bar and the command line."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from bench.serving.arrivals import ArrivalProcess
from bench.serving.cli import build_parser, make_dataset
from bench.serving.client import Endpoint, StreamReader, build_body, first_model, send_request
from bench.serving.datasets import PromptMaker, RandomDataset, RequestSpec
from bench.serving.progress import Progress
from bench.serving.runner import BenchConfig, parse_concurrencies, run_benchmark, send_all
from services import cli

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
COMPLETIONS = Endpoint("completions", "m")


def sse(*chunks: dict[str, Any] | str) -> bytes:
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return "".join(lines).encode()


def completion_stream(body: dict[str, Any]) -> bytes:
    """What a server streams for a completions body: one chunk per token, then usage, then [DONE]."""
    n = body["max_tokens"]
    prompt = len(body["prompt"]) if isinstance(body["prompt"], list) else len(body["prompt"].split())
    chunks: list[dict[str, Any] | str] = [{"choices": [{"index": 0, "text": f" t{i}"}]} for i in range(n)]
    chunks.append({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n}})
    chunks.append("[DONE]")
    return sse(*chunks)


def client_for(handler: Handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://bench.test", transport=httpx.MockTransport(handler))


def send(handler: Handler, endpoint: Endpoint = COMPLETIONS, prompt: str | list[int] = [1, 2, 3]) -> Any:
    async def go() -> Any:
        async with client_for(handler) as client:
            return await send_request(client, endpoint, RequestSpec(prompt, 3, 4))

    return asyncio.run(go())


def test_completions_body_asks_for_exactly_the_output_length() -> None:
    body = build_body(COMPLETIONS, RequestSpec([5, 6, 7], 3, 12))
    assert body == {
        "model": "m",
        "prompt": [5, 6, 7],
        "max_tokens": 12,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "min_tokens": 12,
    }
    plain = build_body(Endpoint("completions", "m", ignore_eos=False), RequestSpec("hi", 1, 5))
    assert "ignore_eos" not in plain and "min_tokens" not in plain


def test_chat_body_sends_one_user_message_and_extra_body_wins() -> None:
    endpoint = Endpoint("chat", "m", extra_body={"temperature": 0.7, "top_p": 0.9})
    body = build_body(endpoint, RequestSpec("hello there", 2, 8))
    assert body["messages"] == [{"role": "user", "content": "hello there"}] and "prompt" not in body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.9, 8)
    assert endpoint.url_path == "/v1/chat/completions" and COMPLETIONS.url_path == "/v1/completions"
    with pytest.raises(ValueError, match="text prompts"):
        build_body(endpoint, RequestSpec([1, 2], 2, 8))


def test_stream_reader_reads_text_usage_errors_and_ignores_the_rest() -> None:
    chat = StreamReader("chat")
    assert chat.read("") is None and chat.read(": keep-alive") is None and chat.read("event: x") is None
    role = chat.read('data: {"choices":[{"delta":{"role":"assistant","content":""}}]}')
    assert role is not None and role.text == ""  # no text: not the first token
    assert chat.read('data:{"choices":[{"delta":{"content":"Hi"}}]}').text == "Hi"  # type: ignore[union-attr]
    assert chat.read('data: {"choices":[{"delta":{"reasoning_content":"hmm"}}]}').text == "hmm"  # type: ignore[union-attr]
    usage = chat.read('data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}')
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (9, 4)
    assert chat.read("data: [DONE]").done  # type: ignore[union-attr]
    assert chat.read('data: {"error":{"message":"overloaded","code":503}}').error == "overloaded"  # type: ignore[union-attr]
    assert "not JSON" in chat.read("data: {oops").error  # type: ignore[union-attr]
    assert StreamReader("completions").read('data: {"choices":[{"text":" x"}]}').text == " x"  # type: ignore[union-attr]


def test_a_streamed_completion_is_timed_and_counted() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=completion_stream(json.loads(request.content)))

    result = send(handler)
    assert result.ok and result.error == ""
    assert (result.output_tokens, result.prompt_tokens, result.chunks) == (4, 3, 4)
    assert result.text == " t0 t1 t2 t3" and len(result.itl_s) == 3
    assert 0 < result.ttft_s <= result.latency_s


@pytest.mark.parametrize(
    "response, error",
    [
        (httpx.Response(503, json={"error": {"message": "server busy", "code": 503}}), "HTTP 503: server busy"),
        (httpx.Response(401, text="no key"), "HTTP 401: no key"),
        (
            httpx.Response(200, content=sse({"choices": [{"text": "a"}]}, {"error": {"message": "engine died"}})),
            "error in the stream: engine died",
        ),
        (
            httpx.Response(200, content=sse({"choices": [], "usage": {"completion_tokens": 0}}, "[DONE]")),
            "without any output text",
        ),
    ],
)
def test_failures_are_results_with_their_error(response: httpx.Response, error: str) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return response

    result = send(handler)
    assert not result.ok and error in result.error


def test_a_refused_connection_is_a_failure_not_an_exception() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    result = send(handler)
    assert not result.ok and result.error == "ConnectError: connection refused"


def test_a_connection_closed_before_any_response_is_sent_again_once() -> None:
    """uvicorn closes a keep-alive connection idle for 5 s; a request that meets the close was never seen."""
    calls: list[int] = []

    async def closed_once(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, content=completion_stream(json.loads(request.content)))

    result = send(closed_once)
    assert result.ok and result.chunks == 4 and len(calls) == 2

    calls.clear()

    async def always_closed(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    result = send(always_closed)
    assert not result.ok and result.error.startswith("RemoteProtocolError") and len(calls) == 2


def test_a_stream_cut_after_the_response_began_is_not_sent_again() -> None:
    calls: list[int] = []

    class CutStream(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            yield sse({"choices": [{"index": 0, "text": " t0"}]})
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, stream=CutStream())

    result = send(handler)
    assert not result.ok and result.error.startswith("RemoteProtocolError") and len(calls) == 1


def test_first_model_is_the_default() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"object": "list", "data": [{"id": "served-a"}, {"id": "served-b"}]})

    async def go() -> str:
        async with client_for(handler) as client:
            return await first_model(client)

    assert asyncio.run(go()) == "served-a"


class FakeServer:
    """Streams completions after a short wait, and records how many were in flight and when each came."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s
        self.in_flight = 0
        self.peak = 0
        self.arrivals: list[float] = []
        self.bodies: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        if request.url.path == "/metrics":
            return httpx.Response(404)
        self.arrivals.append(time.perf_counter() - self.start)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        body = json.loads(request.content)
        self.bodies.append(body)
        return httpx.Response(200, content=completion_stream(body))


def specs(n: int) -> list[RequestSpec]:
    return [RequestSpec([1, 2, 3, 4], 4, 3) for _ in range(n)]


def test_send_all_keeps_to_the_concurrency_limit() -> None:
    server = FakeServer()

    async def go() -> Any:
        async with client_for(server) as client:
            return await send_all(client, COMPLETIONS, specs(12), [0.0] * 12, max_concurrency=3)

    results, duration = asyncio.run(go())
    assert len(results) == 12 and all(r.ok for r in results)
    assert server.peak == 3
    assert duration >= 4 * server.delay_s  # 12 requests, 3 at a time


def test_send_all_sends_each_request_at_its_arrival_time() -> None:
    server = FakeServer(delay_s=0.0)
    times = [0.0, 0.1, 0.2, 0.3]

    async def go() -> Any:
        async with client_for(server) as client:
            server.start = time.perf_counter()
            return await send_all(client, COMPLETIONS, specs(4), times, max_concurrency=None)

    results, _ = asyncio.run(go())
    for arrived, planned in zip(server.arrivals, times):
        assert arrived >= planned - 0.005
    assert [round(r.started_s, 1) for r in results] == times


def test_run_benchmark_warms_up_uncounted_and_sweeps_with_fresh_prompts() -> None:
    server = FakeServer(delay_s=0.005)
    config = BenchConfig(
        base_url="http://bench.test",
        endpoint=Endpoint("completions", ""),  # the model from /v1/models
        num_prompts=6,
        concurrencies=[1, 4],
        arrivals=ArrivalProcess(),
        num_warmups=2,
        progress=False,
        transport=httpx.MockTransport(server),
    )
    dataset = RandomDataset(PromptMaker("ids", None, 1000), input_len=5, output_len=7)
    endpoint, runs = asyncio.run(run_benchmark(config, dataset, log=io.StringIO()))
    assert endpoint.model == "fake-model"
    assert len(server.bodies) == 2 + 6 + 6
    assert [b["max_tokens"] for b in server.bodies[:2]] == [7, 7]  # warm-ups: the shape, at most 16 out
    assert [r.max_concurrency for r in runs] == [1, 4]
    for run in runs:
        m = run.metrics
        assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (6, 0, 30, 42)
        assert run.server_metrics is None  # no /metrics there
    assert runs[0].metrics["max_concurrent_requests"] == 1
    prompts = [tuple(b["prompt"]) for b in server.bodies]
    assert not set(prompts[2:8]) & set(prompts[8:])  # each sweep point has its own prompts
    assert not set(prompts[:2]) & set(prompts[2:])


def test_plain_progress_prints_tenths_in_a_log() -> None:
    stream = io.StringIO()
    progress = Progress(20, "run", use_tqdm=False, stream=stream)
    for i in range(20):
        progress.update(ok=i != 3)
    progress.close()
    lines = stream.getvalue().splitlines()
    # The first request, then one line per tenth of the run.
    assert (
        len(lines) == 11
        and lines[0].endswith("1/20 0.0 s")
        and lines[-1].startswith("run: [")
        and "20/20" in lines[-1]
        and "1 failed" in lines[-1]
    )
    quiet = io.StringIO()
    off = Progress(5, enabled=False, stream=quiet)
    off.update()
    off.close()
    assert quiet.getvalue() == ""


def test_command_line_defaults_and_choices(tmp_path: Any) -> None:
    args = build_parser().parse_args([])
    assert (args.base_url, args.endpoint_type, args.dataset_name, args.num_warmups) == (
        "http://127.0.0.1:8000", "completions", "random", 1,
    )  # fmt: skip
    assert args.request_rate == float("inf") and args.percentiles == [99.0] and args.ignore_eos
    dataset = make_dataset(args, None)
    assert isinstance(dataset, RandomDataset) and dataset.maker.prompt_format == "ids" and dataset.exact
    chat = build_parser().parse_args(["--endpoint-type", "chat", "--input-len", "64", "--no-warmup"])
    assert chat.num_warmups == 0 and make_dataset(chat, None).describe()["prompt_format"] == "text"
    sweep = build_parser().parse_args(["--sweep-concurrency", "1,4,16", "--metric-percentiles", "50,99.9"])
    assert sweep.sweep_concurrency == [1, 4, 16] and sweep.percentiles == [50.0, 99.9]
    assert parse_concurrencies("1, 4") == [1, 4]
    for bad in (["--sweep-concurrency", "1,0"], ["--request-rate", "0"], ["--percentile-metrics", "ttft,foo"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    with pytest.raises(SystemExit, match="--dataset-path"):
        make_dataset(build_parser().parse_args(["--dataset-name", "sharegpt"]), None)
    with pytest.raises(SystemExit, match="chat prompts are text"):
        make_dataset(build_parser().parse_args(["--endpoint-type", "chat", "--prompt-format", "ids"]), None)


def test_scalellm_lists_bench_and_hands_it_the_rest_of_the_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "bench" in capsys.readouterr().out
    seen: list[list[str]] = []
    monkeypatch.setattr("bench.serving.cli.main", lambda argv: seen.append(list(argv)) or 0)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--max-concurrency", "4", "plot"])
    assert exit_info.value.code == 0 and seen == [["--max-concurrency", "4", "plot"]]
