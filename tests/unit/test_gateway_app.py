"""The gateway's HTTP app end to end, in-process: fakeredis plus a scripted fake pipeline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.messages import CompletionRequest, Heartbeat, ResponseBatch
from tests.fakes.gateway import (
    GATEWAY_ID,
    FakePipeline,
    completion_scope,
    delta,
    fails_mid_stream,
    hello_world,
    one_delta_then_silent,
    prompt_too_long,
    running,
    silent,
    sse_events,
    waits_for_release,
)

pytestmark = pytest.mark.anyio
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


async def test_completion_returns_the_pipeline_text_in_openai_shape() -> None:
    async with running() as h:
        reply = await h.http.post("/v1/completions", json={"prompt": "Say hi", "max_tokens": 5, "stop": "\n"})
        assert reply.status_code == 200
        body = reply.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["model"] == "SmolLM2-135M-Instruct"
        assert body["choices"] == [{"index": 0, "text": "Hello world", "logprobs": None, "finish_reason": "stop"}]
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        sent = h.pipeline.requests[0]
        assert sent.request_id == body["id"] and sent.gateway_id == GATEWAY_ID and sent.prompt == "Say hi"
        assert sent.sampling.max_tokens == 5 and sent.detokenize.stop == ["\n"]
        assert len(h.gateway.registry) == 0


async def test_default_max_tokens_is_a_cap_the_tokenizer_lowers_to_the_context() -> None:
    async with running(default_max_tokens=7) as h:
        await h.http.post("/v1/completions", json={"prompt": [5, 6, 7]})
        sent = h.pipeline.requests[0]
        assert sent.sampling.max_tokens == 7 and sent.max_tokens_is_default
        assert sent.prompt == [5, 6, 7]
        await h.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert not h.pipeline.requests[1].max_tokens_is_default


async def test_streamed_completion_with_usage_chunk() -> None:
    async with running() as h:
        reply = await h.http.post(
            "/v1/completions", json={"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
        )
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = sse_events(reply.text)
        assert events[-1] == "[DONE]"
        usage_chunk = events[-2]
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 5
        chunks = events[:-2]
        assert all(c["object"] == "text_completion" for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world"
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]


async def test_chat_completion_forwards_messages_and_answers_as_assistant() -> None:
    async with running() as h:
        body = {
            "messages": [
                {"role": "system", "content": "Be brief"},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ]
        }
        reply = await h.http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200
        data = reply.json()
        assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
        assert data["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
        assert data["choices"][0]["finish_reason"] == "stop"
        sent = h.pipeline.requests[0]
        assert [(m.role, m.content) for m in sent.messages] == [("system", "Be brief"), ("user", "Hi")]


async def test_streamed_chat_starts_with_the_assistant_role() -> None:
    async with running() as h:
        reply = await h.http.post("/v1/chat/completions", json=CHAT | {"stream": True})
        events = sse_events(reply.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello world"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_logprobs_of_ids_only_deltas_name_tokens_by_id() -> None:
    """A detokenizer older than named logprobs sends ids: the gateway names them "token_id:<id>"."""

    async def with_logprobs(pipeline: FakePipeline, request: CompletionRequest) -> None:
        await pipeline.send(
            request,
            ResponseBatch(deltas=[delta(request, "Hi", [42], "stop", logprobs=[(-0.5, [(42, -0.5), (7, -1.5)])])]),
        )

    async with running(with_logprobs) as h:
        reply = await h.http.post("/v1/chat/completions", json=CHAT | {"logprobs": True, "top_logprobs": 2})
        assert h.pipeline.requests[0].sampling.logprobs == 2
        content = reply.json()["choices"][0]["logprobs"]["content"]
        assert content[0]["token"] == "token_id:42" and content[0]["logprob"] == -0.5
        assert [t["token"] for t in content[0]["top_logprobs"]] == ["token_id:42", "token_id:7"]


async def test_pipeline_error_before_output_keeps_its_status_even_when_streaming() -> None:
    async with running(prompt_too_long) as h:
        for stream in (False, True):
            reply = await h.http.post("/v1/completions", json={"prompt": "x" * 50, "stream": stream})
            assert reply.status_code == 400
            assert reply.json()["error"]["message"] == "prompt too long"
            assert reply.json()["error"]["param"] == "prompt"
        assert await h.pipeline.aborted_ids() == []  # the pipeline ended them itself


async def test_error_mid_stream_is_an_sse_error_event() -> None:
    async with running(fails_mid_stream) as h:
        reply = await h.http.post("/v1/chat/completions", json=CHAT | {"stream": True})
        assert reply.status_code == 200
        events = sse_events(reply.text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["message"] == "engine crashed"
        assert events[-3]["choices"][0]["delta"]["content"] == "Hel"


async def test_timeout_gives_504_and_aborts_the_request() -> None:
    async with running(silent, request_timeout_s=0.2) as h:
        reply = await h.http.post("/v1/completions", json={"prompt": "x"})
        assert reply.status_code == 504
        assert reply.json()["error"]["code"] == "timeout"
        await asyncio.sleep(0.05)  # the abort goes out through the batching writer
        assert await h.pipeline.aborted_ids() == [h.pipeline.requests[0].request_id]
        assert len(h.gateway.registry) == 0


async def test_timeout_after_stream_began_is_an_sse_error_and_an_abort() -> None:
    async with running(one_delta_then_silent, request_timeout_s=0.3) as h:
        reply = await h.http.post("/v1/completions", json={"prompt": "x", "stream": True})
        assert reply.status_code == 200
        events = sse_events(reply.text)
        assert events[0]["choices"][0]["text"] == "Hel"
        assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
        await asyncio.sleep(0.05)
        assert await h.pipeline.aborted_ids() == [h.pipeline.requests[0].request_id]


async def test_unknown_model_is_404_model_not_found() -> None:
    async with running() as h:
        reply = await h.http.post("/v1/completions", json={"prompt": "x", "model": "gpt-9"})
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "model_not_found"
        assert reply.json()["error"]["param"] == "model"
        ok = await h.http.post("/v1/completions", json={"prompt": "x", "model": "SmolLM2-135M-Instruct"})
        assert ok.status_code == 200
        assert h.pipeline.requests and len(h.pipeline.requests) == 1


async def test_bad_bodies_are_400_naming_the_param() -> None:
    async with running() as h:
        bad_json = await h.http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
        many = await h.http.post("/v1/chat/completions", json=CHAT | {"n": 9})  # SCALELLM_MAX_N: 8
        assert many.status_code == 400 and many.json()["error"]["param"] == "n"
        assert "SCALELLM_MAX_N" in many.json()["error"]["message"]
        assert h.pipeline.requests == []


async def test_a_body_over_the_size_limit_is_413_and_never_reaches_the_pipeline() -> None:
    async with running(max_request_bytes=1000) as h:
        big = await h.http.post("/v1/completions", json={"prompt": "x" * 2000})
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "request_too_large"

        async def chunked() -> AsyncIterator[bytes]:  # no content-length: counted while read
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 200
            yield b'"}'

        streamed = await h.http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert h.pipeline.requests == []
        small = await h.http.post("/v1/completions", json={"prompt": "x" * 100})
        assert small.status_code == 200


async def test_api_key_is_required_on_v1_but_not_on_health() -> None:
    async with running(api_key="sekret") as h:
        missing = await h.http.post("/v1/completions", json={"prompt": "x"})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = await h.http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = await h.http.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer sekret"})
        assert good.status_code == 200
        for path in ("/health", "/ready", "/version", "/openapi.json"):
            assert (await h.http.get(path)).status_code in (200, 503), path  # open: never 401


async def test_requests_over_the_inflight_limit_get_503_with_retry_after() -> None:
    async with running(waits_for_release, max_inflight_requests=1) as h:
        first = asyncio.create_task(h.http.post("/v1/completions", json={"prompt": "x"}))
        await h.pipeline.wait_for_requests(1)
        second = await h.http.post("/v1/completions", json={"prompt": "y"})
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        h.pipeline.release.set()
        assert (await first).status_code == 200
        assert (await h.http.post("/v1/completions", json={"prompt": "z"})).status_code == 200


async def test_client_disconnect_while_streaming_aborts_and_releases() -> None:
    async with running(one_delta_then_silent) as h:
        disconnected = asyncio.Event()
        sent: list[dict[str, Any]] = []
        body = json.dumps({"prompt": "x", "stream": True}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                disconnected.set()  # the client leaves after the first chunk

        await asyncio.wait_for(h.app(completion_scope(), receive, send), 5)
        assert sent[0]["status"] == 200
        await asyncio.sleep(0.05)
        assert await h.pipeline.aborted_ids() == [h.pipeline.requests[0].request_id]
        assert len(h.gateway.registry) == 0


async def test_ready_reports_missing_roles_until_all_are_alive_while_health_is_always_200() -> None:
    async with running() as h:
        reply = await h.http.get("/ready")
        assert reply.status_code == 503
        assert reply.json()["missing"] == ["tokenizer", "engine", "detokenizer"]
        assert (await h.http.get("/health")).json() == {"status": "ok"}  # liveness: the process answers
        for role in ("tokenizer", "engine", "detokenizer"):
            await h.pipeline.transport.beat(Heartbeat(role=role, replica_id=f"{role}-1", time=0.0), ttl_s=10)
        reply = await h.http.get("/ready")
        assert reply.status_code == 200
        assert reply.json()["alive"] == {"tokenizer": 1, "engine": 1, "detokenizer": 1}


async def test_models_lists_the_served_name() -> None:
    async with running(served_model_name="my-model") as h:
        data = (await h.http.get("/v1/models")).json()
        assert [m["id"] for m in data["data"]] == ["my-model"]
        assert (await h.http.get("/v1/models/my-model")).status_code == 200
        assert (await h.http.get("/v1/models/other")).status_code == 404


async def test_shutdown_puts_an_expiry_on_the_responses_stream() -> None:
    async with running() as h:
        await h.http.post("/v1/completions", json={"prompt": "x"})
        redis = h.redis
    ttl = await redis.ttl(f"t:responses:{GATEWAY_ID}")
    assert 0 < ttl <= 3600


async def test_echo_prepends_the_prompt_and_a_failed_generation_is_a_500() -> None:
    async def errors(pipeline: FakePipeline, request: CompletionRequest) -> None:
        if request.prompt == "bad":
            await pipeline.send(request, ResponseBatch(deltas=[delta(request, "", [], "error")]))
        else:
            await hello_world(pipeline, request)

    async with running(errors) as h:
        echoed = await h.http.post("/v1/completions", json={"prompt": "Q: ", "echo": True})
        assert echoed.json()["choices"][0]["text"] == "Q: Hello world"
        failed = await h.http.post("/v1/completions", json={"prompt": "bad"})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"


async def test_shutdown_ends_waiting_requests_with_503_and_aborts_them() -> None:
    async with running(silent) as h:
        waiting = asyncio.create_task(h.http.post("/v1/completions", json={"prompt": "x"}))
        await h.pipeline.wait_for_requests(1)
        h.gateway.client.fail_in_flight()
        reply = await waiting
        assert reply.status_code == 503
        assert (await h.http.get("/ready")).status_code == 503
        assert (await h.http.get("/health")).status_code == 200
        refused = await h.http.post("/v1/completions", json={"prompt": "y"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        await asyncio.sleep(0.05)
        assert await h.pipeline.aborted_ids() == [h.pipeline.requests[0].request_id]


async def test_a_gateway_an_engine_took_for_gone_ends_waiting_requests_with_503_but_keeps_serving() -> None:
    async def silent_first(pipeline: FakePipeline, request: CompletionRequest) -> None:
        if len(pipeline.requests) > 1:
            await hello_world(pipeline, request)

    async with running(silent_first) as h:
        waiting = asyncio.create_task(h.http.post("/v1/completions", json={"prompt": "x"}))
        await h.pipeline.wait_for_requests(1)
        # As if the gateway had stalled past its TTL and an engine had aborted its
        # requests, which would then never end: the engine leaves its mark.
        await h.redis.delete(f"t:heartbeat:gateway:{GATEWAY_ID}")
        assert await h.pipeline.transport.reap("gateway", [GATEWAY_ID], keep_s=10) == [GATEWAY_ID]
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.status_code == 503 and "lost contact" in reply.json()["error"]["message"]
        assert (await h.http.post("/v1/completions", json={"prompt": "y"})).status_code == 200


async def test_a_heartbeat_lapse_no_engine_acted_on_keeps_the_requests_in_flight() -> None:
    """Redis stalling for longer than the TTL expires every heartbeat; nobody reaped anybody."""
    async with running(waits_for_release) as h:
        waiting = asyncio.create_task(h.http.post("/v1/completions", json={"prompt": "x"}))
        await h.pipeline.wait_for_requests(1)
        heartbeat = f"t:heartbeat:gateway:{GATEWAY_ID}"
        await h.redis.delete(heartbeat)
        async with asyncio.timeout(5):
            while not await h.redis.exists(heartbeat):  # the gateway beat again, past the lapse
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        h.pipeline.release.set()
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "Hello world"


async def test_a_wrong_method_is_a_json_405_that_says_which_methods_are_allowed() -> None:
    async with running() as h:
        reply = await h.http.request("TRACE", "/v1/completions")
        assert reply.status_code == 405 and reply.headers["allow"] == "POST"
        assert reply.json()["error"]["message"] == "Method Not Allowed: TRACE /v1/completions"
