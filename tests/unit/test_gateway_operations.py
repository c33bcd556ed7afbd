"""Issue 9 items 3 and 5 in-process (fakeredis and a scripted pipeline): /tokenize, /detokenize,
/version, /health and /ready, X-Request-Id, the access log, CORS, several API keys, the model
card's max_model_len, continuous usage and unknown fields."""

from __future__ import annotations

import logging

import pytest

from shared.messages import Heartbeat, TokenizeRequest
from tests.fakes.gateway import running, sse_events

pytestmark = pytest.mark.anyio
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


async def test_tokenize_and_detokenize_are_answered_by_the_pipeline() -> None:
    async with running() as h:
        reply = await h.http.post("/tokenize", json={"prompt": "Hey", "return_token_strs": True})
        assert reply.status_code == 200, reply.text
        assert reply.json() == {
            "count": 3,
            "max_model_len": 2048,
            "tokens": [72, 101, 121],
            "token_strs": ["H", "e", "y"],
        }
        sent = h.pipeline.calls[0]
        assert (
            isinstance(sent, TokenizeRequest)
            and sent.add_special_tokens is True
            and sent.request_id.startswith("tokn-")
        )
        chat = await h.http.post(
            "/tokenize",
            json=CHAT
            | {"add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": {"a": 1}},
        )
        assert chat.json()["tokens"] == [72, 105] and chat.json()["token_strs"] is None
        sent = h.pipeline.calls[1]
        assert isinstance(sent, TokenizeRequest) and sent.continue_final_message and sent.add_special_tokens is False
        assert sent.chat_template_kwargs == '{"a": 1}'
        back = await h.http.post("/detokenize", json={"tokens": [72, 105]})
        assert back.status_code == 200 and back.json() == {"prompt": "Hi"}
        assert len(h.gateway.registry) == 0


async def test_tokenize_errors_are_openai_style() -> None:
    async with running(max_prompt_chars=10) as h:
        bad_id = await h.http.post("/detokenize", json={"tokens": [5, 5000]})
        assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "tokens"
        negative = await h.http.post("/detokenize", json={"tokens": [-1]})
        assert negative.status_code == 400 and negative.json()["error"]["param"] == "tokens[0]"
        too_long = await h.http.post("/tokenize", json={"prompt": "x" * 11})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "string_above_max_length"
        both = await h.http.post("/tokenize", json=CHAT | {"continue_final_message": True})
        assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
        template = await h.http.post("/tokenize", json=CHAT | {"chat_template": "{{ 1 }}"})
        assert template.status_code == 400 and template.json()["error"]["code"] == "unsupported_parameter"
        model = await h.http.post("/tokenize", json={"prompt": "x", "model": "gpt-9"})
        assert model.status_code == 404
        assert (await h.http.post("/tokenize", content=b"{")).json()["error"]["code"] == "invalid_json"
        deep = b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        assert (await h.http.post("/tokenize", content=deep)).json()["error"]["code"] == "invalid_json"
        assert (await h.http.post("/tokenize", json=[1])).json()["error"]["code"] == "invalid_type"


async def test_a_tokenize_call_times_out_with_504() -> None:
    async with running(request_timeout_s=0.2) as h:
        h.pipeline.answer_calls = False
        reply = await h.http.post("/tokenize", json={"prompt": "x"})
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        assert len(h.gateway.registry) == 0


async def test_version_and_liveness_need_nothing() -> None:
    async with running() as h:
        version = await h.http.get("/version")
        assert version.status_code == 200 and isinstance(version.json()["version"], str)
        assert (await h.http.get("/health")).json() == {"status": "ok"}


async def test_the_clients_request_id_is_used_and_echoed_on_every_response() -> None:
    async with running(api_key="k", max_request_bytes=200) as h:
        auth = {"Authorization": "Bearer k"}
        ok = await h.http.post("/v1/completions", json={"prompt": "x"}, headers=auth | {"X-Request-Id": "abc-123"})
        assert ok.headers["x-request-id"] == "abc-123" and ok.json()["id"] == "cmpl-abc-123"
        # In the pipeline the id is unique even if the client reuses it.
        assert h.pipeline.requests[0].request_id.startswith("cmpl-abc-123-")
        streamed = await h.http.post(
            "/v1/chat/completions", json=CHAT | {"stream": True}, headers=auth | {"X-Request-Id": "s.1:2"}
        )
        assert streamed.headers["x-request-id"] == "s.1:2" and sse_events(streamed.text)[0]["id"] == "chatcmpl-s.1:2"
        for method, path, kwargs, status in (
            ("POST", "/v1/completions", {"json": {"prompt": "x", "n": 9}, "headers": auth}, 400),
            ("POST", "/v1/completions", {"json": {"prompt": "x"}}, 401),
            ("GET", "/nowhere", {}, 404),
            ("POST", "/v1/completions", {"content": b"x" * 300, "headers": auth}, 413),
            ("TRACE", "/v1/completions", {}, 405),
        ):
            headers = dict(kwargs.pop("headers", {})) | {"X-Request-Id": f"id-{status}"}  # type: ignore[arg-type]
            reply = await h.http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
            assert reply.status_code == status and reply.headers["x-request-id"] == f"id-{status}"


async def test_an_unsafe_request_id_is_replaced() -> None:
    async with running() as h:
        for unsafe in ("has space", "x" * 129, "semi;colon", ""):
            reply = await h.http.get("/health", headers={"X-Request-Id": unsafe})
            echoed = reply.headers["x-request-id"]
            assert echoed != unsafe and len(echoed) == 32
        generated = await h.http.post("/v1/completions", json={"prompt": "x"})
        assert generated.json()["id"] == "cmpl-" + generated.headers["x-request-id"]
        assert h.pipeline.requests[0].request_id == generated.json()["id"]


async def test_one_access_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as h:
        with caplog.at_level(logging.INFO, logger="scalellm.access"):
            await h.http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "log-1"})
            await h.http.get("/nowhere", headers={"X-Request-Id": "log-2"})
        lines = [r for r in caplog.records if r.name == "scalellm.access"]
        assert len(lines) == 2
        first = lines[0].getMessage()
        assert first.startswith("request_id=log-1 method=POST path=/v1/completions status=200 prompt_tokens=3 ")
        assert "completion_tokens=2 ttft_ms=" in first and "latency_ms=" in first
        fields = lines[0].access  # type: ignore[attr-defined]  # for structured (JSON) handlers
        assert fields["ttft_ms"] is not None and fields["ttft_ms"] <= fields["latency_ms"]
        assert lines[1].getMessage().startswith("request_id=log-2 method=GET path=/nowhere status=404 prompt_tokens=-")


async def test_the_access_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    async with running(access_log=False) as h:
        with caplog.at_level(logging.INFO, logger="scalellm.access"):
            await h.http.get("/health")
        assert not [r for r in caplog.records if r.name == "scalellm.access"]


async def test_cors_is_off_by_default_and_answers_preflights_when_configured() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with running() as h:
        reply = await h.http.options("/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in reply.headers
    async with running(cors_allow_origins="https://app.example, https://other.example") as h:
        reply = await h.http.options("/v1/completions", headers=preflight | {"X-Request-Id": "pre-1"})
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "https://app.example"
        assert reply.headers["x-request-id"] == "pre-1"
        cross = await h.http.post("/v1/completions", json={"prompt": "x"}, headers={"Origin": "https://app.example"})
        assert cross.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in cross.headers["access-control-expose-headers"].lower()
        stranger = await h.http.options("/v1/completions", headers=preflight | {"Origin": "https://evil.example"})
        assert stranger.status_code == 400


async def test_any_of_several_api_keys_is_accepted() -> None:
    async with running(api_key="one", api_keys="two, three") as h:
        for key in ("one", "two", "three"):
            reply = await h.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 200, key
        for wrong in ("Bearer four", "Bearer two,three", "Basic two", ""):
            assert (await h.http.get("/v1/models", headers={"Authorization": wrong})).status_code == 401
        assert (await h.http.post("/tokenize", json={"prompt": "x"})).status_code == 401


async def test_the_model_card_has_max_model_len_from_the_tokenizers_or_the_setting() -> None:
    async with running() as h:
        assert (await h.http.get("/v1/models")).json()["data"][0]["max_model_len"] is None
    async with running() as h:
        for replica, length in (("t1", 4096), ("t2", 2048)):
            beat = Heartbeat(role="tokenizer", replica_id=replica, time=0.0, max_model_len=length)
            await h.pipeline.transport.beat(beat, ttl_s=10)
        card = (await h.http.get("/v1/models")).json()["data"][0]
        assert card["max_model_len"] == 2048  # the smallest: what every replica accepts
    async with running(max_model_len=1000) as h:
        assert (await h.http.get("/v1/models/SmolLM2-135M-Instruct")).json()["max_model_len"] == 1000


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk() -> None:
    async with running() as h:
        options = {"include_usage": True, "continuous_usage_stats": True}
        reply = await h.http.post("/v1/chat/completions", json=CHAT | {"stream": True, "stream_options": options})
        chunks = sse_events(reply.text)[:-1]
        usages = [c["usage"] for c in chunks]
        assert [u["completion_tokens"] for u in usages] == [0, 1, 2, 2]  # role, "Hello", " world", the usage chunk
        assert chunks[-1]["choices"] == []
        plain = await h.http.post(
            "/v1/chat/completions", json=CHAT | {"stream": True, "stream_options": {"include_usage": True}}
        )
        assert [c["usage"] for c in sse_events(plain.text)[:-2]] == [None, None, None]


async def test_unknown_fields_are_logged_once_per_name(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as h:
        with caplog.at_level(logging.WARNING, logger="services.gateway"):
            for _ in range(3):
                await h.http.post("/v1/completions", json={"prompt": "x", "mystery_option": {}, "best_of": 1})
            await h.http.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "y", "refusal": "n"}]}
            )
        notes = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
        assert notes == [
            "/v1/completions: ignoring the unknown request field 'mystery_option' (logged once per field)",
            "/v1/chat/completions: ignoring the unknown request field 'messages[].refusal' (logged once per field)",
        ]
