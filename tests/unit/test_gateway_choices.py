"""n > 1 and batched prompts: the plan of choices (pure), and the gateway fanning them out and back."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from services.gateway.choices import SEED_SPAN, merged_response, merged_usage, plan_choices
from services.gateway.protocol import parse_completion
from services.gateway.to_pipeline import pipeline_request
from shared.messages import CompletionRequest, RequestFailed
from tests.fakes.gateway import (
    FakePipeline,
    completion_scope,
    hello_world,
    one_delta_then_silent,
    running,
    sse_events,
)
from tests.unit.test_gateway_slow_clients import CAP, StalledClient, floods_or_greets

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def test_a_single_choice_keeps_the_request_id_and_seed() -> None:
    [choice] = plan_choices("cmpl-a", 1, 1, 7)
    assert (choice.index, choice.request_id, choice.seed) == (0, "cmpl-a", 7)


def test_choices_are_ordered_prompt_then_sample_with_ids_and_seeds_of_their_own() -> None:
    plan = plan_choices("cmpl-a", 2, 3, 10)
    assert [(c.index, c.prompt_index, c.sample) for c in plan] == [
        (0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 1, 0), (4, 1, 1), (5, 1, 2),
    ]  # fmt: skip
    assert [c.request_id for c in plan] == [f"cmpl-a-{i}" for i in range(6)]
    assert [c.seed for c in plan] == [10, 11, 12, 10, 11, 12]  # vLLM: seed + sample, per prompt
    assert {c.seed for c in plan_choices("x", 1, 3, None)} == {None}


def test_the_last_seed_wraps_into_what_msgpack_carries() -> None:
    assert [c.seed for c in plan_choices("x", 1, 3, SEED_SPAN - 2)] == [SEED_SPAN - 2, SEED_SPAN - 1, 0]


def test_usage_counts_each_prompt_once_and_every_choice() -> None:
    plan = plan_choices("x", 2, 2, None)
    usages = [{"prompt_tokens": p, "completion_tokens": c} for p, c in [(5, 1), (5, 2), (7, 3), (7, 4)]]
    assert merged_usage(plan, usages) == {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22}


def test_merged_response_orders_choices_by_index() -> None:
    plan = plan_choices("x", 1, 2, None)
    bodies = [
        {"id": "x", "choices": [{"index": 1, "text": "b"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
        {"id": "x", "choices": [{"index": 0, "text": "a"}], "usage": {"prompt_tokens": 2, "completion_tokens": 3}},
    ]
    merged = merged_response(plan[::-1], bodies)
    assert [c["text"] for c in merged["choices"]] == ["a", "b"]
    assert merged["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


@pytest.mark.anyio
async def test_n_fans_out_with_ids_seeds_and_indices() -> None:
    async with running() as h:
        reply = await h.http.post("/v1/completions", json={"prompt": "x", "n": 3, "seed": 5})
        body = reply.json()
        assert reply.status_code == 200, body
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert {c["text"] for c in body["choices"]} == {"Hello world"}
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
        sent = sorted(h.pipeline.requests, key=lambda r: r.request_id)
        assert [r.request_id for r in sent] == [f"{body['id']}-{i}" for i in range(3)]
        assert [r.sampling.seed for r in sent] == [5, 6, 7]
        assert len(h.gateway.registry) == 0


@pytest.mark.anyio
async def test_a_batch_streams_every_choice_then_one_usage_chunk() -> None:
    async with running() as h:
        fields = {"prompt": [[1, 2], [3]], "n": 2, "stream": True, "stream_options": {"include_usage": True}}
        reply = await h.http.post("/v1/completions", json=fields)
        events = sse_events(reply.text)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        texts: dict[int, str] = {}
        for chunk in chunks:
            [choice] = chunk["choices"]
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert texts == {i: "Hello world" for i in range(4)}
        [usage] = [e["usage"] for e in events[:-1] if not e["choices"]]
        assert usage == {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}
        assert sorted(r.prompt for r in h.pipeline.requests) == [[1, 2], [1, 2], [3], [3]]  # type: ignore[type-var]


async def refuses_the_second_prompt(pipeline: FakePipeline, request: CompletionRequest) -> None:
    if request.prompt != "bad":
        await hello_world(pipeline, request)
        return
    failure = RequestFailed(
        request_id=request.request_id,
        status=400,
        error_type="invalid_request_error",
        message="too long",
        param="prompt",
    )
    await pipeline.send(request, failure)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_one_refused_prompt_fails_the_batch_naming_it(stream: bool) -> None:
    async with running(refuses_the_second_prompt) as h:
        reply = await h.http.post("/v1/completions", json={"prompt": ["good", "bad"], "stream": stream})
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["param"] == "prompt[1]" and "too long" in error["message"]
        await asyncio.sleep(0.05)
        assert len(h.gateway.registry) == 0


@pytest.mark.anyio
async def test_chat_n_streams_a_role_chunk_per_choice() -> None:
    async with running() as h:
        reply = await h.http.post("/v1/chat/completions", json=CHAT | {"n": 2, "stream": True})
        chunks = sse_events(reply.text)[:-1]
        roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
        assert sorted(roles) == [0, 1]


@pytest.mark.anyio
async def test_client_disconnect_aborts_every_choice() -> None:
    async with running(one_delta_then_silent) as h:
        disconnected = asyncio.Event()
        body = json.dumps({"prompt": "x", "n": 3, "stream": True}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                disconnected.set()

        await asyncio.wait_for(h.app(completion_scope(), receive, send), 5)
        await asyncio.sleep(0.05)
        assert sorted(await h.pipeline.aborted_ids()) == sorted(r.request_id for r in h.pipeline.requests)
        assert len(h.pipeline.requests) == 3 and len(h.gateway.registry) == 0


def test_each_choice_goes_out_with_its_prompt_and_seed() -> None:
    body = parse_completion(json.dumps({"prompt": ["a b", "c"], "echo": True, "n": 2, "seed": 3}).encode())
    plan = plan_choices("cmpl-x", len(body.prompts), 2, body.seed)
    sent = [
        pipeline_request(body, c.request_id, "gw", 1.0, None, prompt_index=c.prompt_index, seed=c.seed) for c in plan
    ]
    assert [(m.request_id, m.prompt, m.sampling.seed) for m in sent] == [
        ("cmpl-x-0", "a b", 3), ("cmpl-x-1", "a b", 4), ("cmpl-x-2", "c", 3), ("cmpl-x-3", "c", 4),
    ]  # fmt: skip
    assert not any(m.detokenize.decode_prompt for m in sent)  # text prompts echo as sent
    ids = parse_completion(json.dumps({"prompt": [[1, 2], [3]], "echo": True}).encode())
    assert pipeline_request(ids, "c", "gw", 1.0, None, prompt_index=1).detokenize.decode_prompt


@pytest.mark.anyio
async def test_a_stalled_reader_of_several_choices_is_cut_off_and_every_choice_aborted() -> None:
    async with running(floods_or_greets, max_buffered_bytes_per_request=CAP, slow_client_timeout_s=30) as h:
        stalled = StalledClient("flood")
        stalled.body = json.dumps({"prompt": "flood", "n": 3, "stream": True, "max_tokens": 100_000}).encode()
        await asyncio.wait_for(h.app(stalled.scope(), stalled.receive, stalled.send), 5)
        assert stalled.aborted.is_set() and stalled.sent[0]["status"] == 200
        await asyncio.sleep(0.05)
        assert sorted(await h.pipeline.aborted_ids()) == sorted(r.request_id for r in h.pipeline.requests)
        assert len(h.pipeline.requests) == 3
        assert len(h.gateway.registry) == 0 and len(h.gateway.slow_clients) == 0


@pytest.mark.anyio
async def test_the_access_log_and_request_count_see_one_request_with_every_choices_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running() as h:
        with caplog.at_level(logging.INFO, logger="scalellm.access"):
            reply = await h.http.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2})
        assert reply.status_code == 200
        [line] = [r.getMessage() for r in caplog.records if r.name == "scalellm.access"]
        assert "status=200 prompt_tokens=6 completion_tokens=8 " in line  # each prompt once, every choice
        metrics = (await h.http.get("/metrics")).text
        assert 'scalellm:gateway_requests_total{endpoint="completions",status="200"} 1.0' in metrics
