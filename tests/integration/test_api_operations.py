"""Issue 9 items 3 and 5 against the real pipeline (echo engine), with the ``openai`` package where it applies.

One pipeline for the module: a tokenizer whose context is 64 tokens (so that a request without
max_tokens ends quickly), the echo engine, a detokenizer, and two gateways: one as deployed by
default, and one with several API keys, CORS and a small prompt limit. The last test stops the
detokenizer to see /ready turn 503 while /health stays 200.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from services.redis_server import free_port
from tests.integration.harness import Pipeline, ServiceProcess

MODEL = "SmolLM2-135M-Instruct"
CONTEXT = 64
KEYS = ["sk-first-1f2e", "sk-second-77aa", "sk-third-0b0b"]
ORIGIN = "https://app.example"
CHAT = [{"role": "user", "content": "hi"}]
PREFILL = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon"}]


@dataclass
class Ops:
    pipeline: Pipeline
    url: str  # the default gateway
    guarded_url: str  # SCALELLM_API_KEY + SCALELLM_API_KEYS, CORS, SCALELLM_MAX_PROMPT_CHARS=1000

    def process(self, name: str) -> ServiceProcess:
        return next(p for p in self.pipeline.processes if p.name == name)


@pytest.fixture(scope="module")
def ops(redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Iterator[Ops]:
    pipeline = Pipeline(redis_url, Path(tmp_path_factory.mktemp("ops-logs")))
    try:
        pipeline.start("tokenizer", max_model_len=str(CONTEXT))
        pipeline.start("engine", engine_backend="echo", echo_step_delay_ms="2")
        pipeline.start("detokenizer")
        port = free_port()
        pipeline.start(
            "gateway",
            gateway_port=str(port),
            gateway_host="127.0.0.1",
            api_key=KEYS[0],
            api_keys=",".join(KEYS[1:]),
            cors_allow_origins=ORIGIN,
            max_prompt_chars="1000",
        )
        pipeline.start_gateway(request_timeout_s="30")  # the default one: pipeline.gateway_url
        pipeline.wait_ready()
        yield Ops(pipeline, pipeline.gateway_url, f"http://127.0.0.1:{port}")
    finally:
        pipeline.stop_all()


@pytest.fixture
def logs_on_failure(request: pytest.FixtureRequest, ops: Ops) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(ops.pipeline.logs())


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("logs_on_failure")]


def openai_client(url: str, key: str = "none") -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **options: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, **options)["input_ids"])


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


# -- item 3: endpoints -------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip_a_prompt(ops: Ops, tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Hello world, ünïcödé 🙂"
    reply = httpx.post(f"{ops.url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    ids = tokenizer.encode(text)
    assert body == {
        "count": len(ids),
        "max_model_len": CONTEXT,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids),
    }
    back = httpx.post(f"{ops.url}/detokenize", json={"model": MODEL, "tokens": ids})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    # Not held to the context, as in vLLM: /tokenize is how a client finds out a prompt is too long.
    long = httpx.post(f"{ops.url}/tokenize", json={"prompt": "word " * 100}).json()
    assert long["count"] > CONTEXT and long["token_strs"] is None


def test_tokenize_and_detokenize_round_trip_a_chat(ops: Ops, tokenizer: PreTrainedTokenizerBase) -> None:
    reply = httpx.post(f"{ops.url}/tokenize", json={"messages": CHAT})
    assert reply.status_code == 200, reply.text
    ids = chat_ids(tokenizer, CHAT, add_generation_prompt=True)
    assert reply.json()["tokens"] == ids and reply.json()["count"] == len(ids)
    text = httpx.post(f"{ops.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenize_and_detokenize_errors_are_openai_style(ops: Ops) -> None:
    out_of_vocabulary = httpx.post(f"{ops.url}/detokenize", json={"tokens": [1, len_of_vocabulary(ops)]})
    assert out_of_vocabulary.status_code == 400
    error = out_of_vocabulary.json()["error"]
    assert error["param"] == "tokens" and "out of vocabulary" in error["message"]
    assert error["type"] == "invalid_request_error"
    negative = httpx.post(f"{ops.url}/detokenize", json={"tokens": [-5]})
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "tokens[0]"
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    too_long = httpx.post(f"{ops.guarded_url}/tokenize", json={"prompt": "x" * 1001}, headers=auth)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "string_above_max_length"
    both = httpx.post(f"{ops.url}/tokenize", json={"messages": PREFILL, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    reserved = httpx.post(f"{ops.url}/tokenize", json={"messages": CHAT, "chat_template_kwargs": {"tokenize": True}})
    assert reserved.status_code == 400 and reserved.json()["error"]["param"] == "chat_template_kwargs"
    assert httpx.post(f"{ops.url}/tokenize", json={"prompt": "x", "model": "gpt-9"}).status_code == 404


def len_of_vocabulary(ops: Ops) -> int:
    from transformers import AutoTokenizer

    from shared.model_files import resolve_model_dir
    from shared.settings import CommonSettings

    return len(AutoTokenizer.from_pretrained(resolve_model_dir(CommonSettings(), weights=False)))


def test_version_is_the_packages(ops: Ops) -> None:
    reply = httpx.get(f"{ops.url}/version")
    assert reply.status_code == 200 and reply.json() == {"version": version("scalellm")}


# -- item 5: operations ------------------------------------------------------------------------


def test_the_clients_request_id_is_echoed_and_names_the_completion(ops: Ops) -> None:
    client = openai_client(ops.url)
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Hello", max_tokens=2, extra_headers={"X-Request-Id": "it-req-1"}
    )
    assert raw.headers["x-request-id"] == "it-req-1" and raw.parse().id == "cmpl-it-req-1"
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2, stream=True, extra_headers={"X-Request-Id": "it-req-2"}
    )
    assert {chunk.id for chunk in stream} == {"chatcmpl-it-req-2"}
    for url, method, path, kwargs, status in (
        (ops.url, "POST", "/v1/chat/completions", {"json": {"messages": CHAT, "temperature": -1}}, 400),
        (ops.guarded_url, "GET", "/v1/models", {}, 401),
        (ops.url, "GET", "/no/such/route", {}, 404),
        (ops.url, "POST", "/detokenize", {"json": {"tokens": [10**6]}}, 400),
    ):
        reply = httpx.request(method, url + path, headers={"X-Request-Id": f"it-{status}"}, **kwargs)
        assert reply.status_code == status and reply.headers["x-request-id"] == f"it-{status}", path
    generated = httpx.get(f"{ops.url}/health", headers={"X-Request-Id": "no spaces allowed"})
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])


def test_one_access_log_line_per_request(ops: Ops, tokenizer: PreTrainedTokenizerBase) -> None:
    reply = httpx.post(
        f"{ops.url}/v1/completions",
        json={"prompt": "Hello world", "max_tokens": 5, "stream": True},
        headers={"X-Request-Id": "it-access-1"},
    )
    assert reply.status_code == 200
    gateway = ops.process("gateway-1")
    wait_for(lambda: "request_id=it-access-1 " in gateway.log(), 5, "the access line")
    [line] = [line for line in gateway.log().splitlines() if "request_id=it-access-1 " in line]
    assert "scalellm.access: request_id=it-access-1 method=POST path=/v1/completions status=200 " in line
    prompt_tokens = len(tokenizer.encode("Hello world"))
    assert f"prompt_tokens={prompt_tokens} completion_tokens=5 " in line
    ttft, latency = (float(v) for v in re.search(r"ttft_ms=([\d.]+) latency_ms=([\d.]+)", line).groups())  # type: ignore[union-attr]
    assert 0 < ttft <= latency


def test_cors_answers_preflights_only_where_configured(ops: Ops) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    allowed = httpx.options(f"{ops.guarded_url}/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    stranger = httpx.options(
        f"{ops.guarded_url}/v1/chat/completions", headers=preflight | {"Origin": "https://x.example"}
    )
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
    off = httpx.options(f"{ops.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers


def test_any_of_several_api_keys_works(ops: Ops) -> None:
    openai = pytest.importorskip("openai")
    for key in KEYS:
        assert [m.id for m in openai_client(ops.guarded_url, key).models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai_client(ops.guarded_url, "sk-not-a-key").models.list()
    tokens = httpx.post(
        f"{ops.guarded_url}/tokenize", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {KEYS[2]}"}
    )
    assert tokens.status_code == 200
    assert httpx.post(f"{ops.guarded_url}/tokenize", json={"prompt": "hi"}).status_code == 401


def test_max_tokens_defaults_to_the_rest_of_the_context(ops: Ops, tokenizer: PreTrainedTokenizerBase) -> None:
    completion = openai_client(ops.url).completions.create(model=MODEL, prompt="one two three")
    ids = tokenizer.encode("one two three")
    assert completion.usage.prompt_tokens == len(ids)
    assert completion.usage.completion_tokens == CONTEXT - len(ids)
    assert completion.choices[0].finish_reason == "length"
    repeats = CONTEXT // len(ids) + 1
    assert completion.choices[0].text == tokenizer.decode((ids * repeats)[: CONTEXT - len(ids)])


def test_the_model_card_has_the_tokenizers_max_model_len(ops: Ops) -> None:
    [card] = openai_client(ops.url).models.list().data
    assert card.id == MODEL and card.max_model_len == CONTEXT  # from the tokenizer's heartbeat


def test_continue_final_message_changes_the_prompt(ops: Ops, tokenizer: PreTrainedTokenizerBase) -> None:
    options = {"add_generation_prompt": False, "continue_final_message": True}
    opened = httpx.post(f"{ops.url}/tokenize", json={"messages": PREFILL} | options).json()
    assert opened["tokens"] == chat_ids(tokenizer, PREFILL, continue_final_message=True)
    assert tokenizer.decode(opened["tokens"]).endswith("<|im_start|>assistant\nOnce upon")
    closed = httpx.post(f"{ops.url}/tokenize", json={"messages": PREFILL, "add_generation_prompt": False}).json()
    assert tokenizer.decode(closed["tokens"]).endswith("Once upon<|im_end|>\n")
    client = openai_client(ops.url)
    continued = client.chat.completions.create(model=MODEL, messages=PREFILL, max_tokens=2, extra_body=options)
    assert continued.usage.prompt_tokens == opened["count"]  # the engine got the open prompt
    default = client.chat.completions.create(model=MODEL, messages=PREFILL, max_tokens=2)
    assert default.usage.prompt_tokens == len(chat_ids(tokenizer, PREFILL, add_generation_prompt=True))


def test_continuous_usage_stats(ops: Ops) -> None:
    stream = openai_client(ops.url).chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    )
    chunks = list(stream)
    usages = [chunk.usage for chunk in chunks]
    assert all(u is not None for u in usages)
    assert usages[0].completion_tokens == 0 and usages[-1].completion_tokens == 4  # type: ignore[union-attr]
    completions = [u.completion_tokens for u in usages]  # type: ignore[union-attr]
    assert completions == sorted(completions)
    assert {u.prompt_tokens for u in usages} == {usages[-1].prompt_tokens}  # type: ignore[union-attr]
    assert chunks[-1].choices == []


def test_unknown_fields_are_logged_once(ops: Ops) -> None:
    client = openai_client(ops.url)
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"it_unknown_option": True})
    gateway = ops.process("gateway-1")
    wait_for(lambda: "it_unknown_option" in gateway.log(), 5, "the unknown-field line")
    [line] = [line for line in gateway.log().splitlines() if "it_unknown_option" in line]
    assert "/v1/completions: ignoring the unknown request field 'it_unknown_option'" in line


# Last: it takes a stage away.
def test_ready_is_503_while_a_stage_has_no_replica_and_health_stays_200(ops: Ops) -> None:
    assert httpx.get(f"{ops.url}/ready").status_code == 200
    detokenizer = ops.process("detokenizer-0")
    detokenizer.stop()  # a clean stop takes its heartbeat away at once
    ops.pipeline.processes.remove(detokenizer)  # stopped on purpose: wait_ready would take it for a crash
    wait_for(lambda: httpx.get(f"{ops.url}/ready").status_code == 503, 10, "/ready to turn 503")
    ready = httpx.get(f"{ops.url}/ready").json()
    assert ready["missing"] == ["detokenizer"] and ready["alive"]["detokenizer"] == 0
    health = httpx.get(f"{ops.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ops.pipeline.start("detokenizer")
    ops.pipeline.wait_ready(60)
    assert httpx.get(f"{ops.url}/ready").json()["missing"] == []
