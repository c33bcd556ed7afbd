"""GET /openapi.json: true to the routes, the request models, the limits and the responses."""

from __future__ import annotations

import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from starlette.routing import Route

from services.gateway.limits import RequestLimits
from services.gateway.openapi import openapi_document
from services.gateway.request_context import SAFE_ID_PATTERN
from shared.messages import Heartbeat
from tests.fakes.gateway import running

pytestmark = pytest.mark.anyio
USER = [{"role": "user", "content": "Hi"}]


def validator(document: dict[str, Any], component: str) -> Draft202012Validator:
    """A validator for one component, its $refs resolved inside the whole document."""
    return Draft202012Validator({**document, "$ref": f"#/components/schemas/{component}"})


def response_validator(document: dict[str, Any], path: str, method: str, status: int) -> Draft202012Validator:
    content = document["paths"][path][method]["responses"][str(status)]["content"]["application/json"]
    return Draft202012Validator({**document, **content["schema"]})


async def test_the_document_lists_every_route_of_the_app() -> None:
    async with running() as h:
        reply = await h.http.get("/openapi.json")
        assert reply.status_code == 200
        document = reply.json()
        assert document["openapi"].startswith("3.1")
        served = {
            (route.path, method.lower())
            for route in h.app.routes
            if isinstance(route, Route) and route.path != "/openapi.json"
            for method in route.methods or ()
            if method != "HEAD"
        }
        served = {(path.replace("{model:path}", "{model}"), method) for path, method in served}
        documented = {(path, method) for path, item in document["paths"].items() for method in item}
        assert documented == served


def test_request_schemas_accept_what_the_server_accepts() -> None:
    document = openapi_document(RequestLimits.defaults(), auth=False)
    completion = validator(document, "CompletionRequest")
    for body in (
        {"prompt": "Hi"},
        {"prompt": ["Hi"], "stop": "\n", "max_tokens": 5, "logprobs": 2},
        {
            "prompt": [1, 2, 3],
            "top_k": -1,
            "seed": 2**64 - 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"prompt": [[1, 2]], "stop": ["a", "b"], "n": None, "vendor_option": 1},
    ):
        completion.validate(body)
    chat = validator(document, "ChatCompletionRequest")
    chat.validate({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "top_logprobs": 2})
    chat.validate({"messages": [{"role": "assistant", "content": None}], "max_completion_tokens": 3})
    tokenize = Draft202012Validator(
        {**document, **document["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]}
    )
    tokenize.validate({"prompt": "Hi", "add_special_tokens": False, "return_token_strs": True})
    tokenize.validate({"messages": USER, "add_generation_prompt": False, "continue_final_message": True})
    assert not tokenize.is_valid({"prompt": 5})
    detokenize = validator(document, "DetokenizeRequest")
    detokenize.validate({"tokens": [1, 2, 3]})
    assert not detokenize.is_valid({"tokens": [-1]})


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": ""},
        {"prompt": ["a", ""]},
        {"prompt": [[1], []]},
        {"prompt": [-1]},
        {"prompt": "x", "max_tokens": -1},  # (0 is valid with echo: a cross-field rule)
        {"prompt": "x", "max_tokens": 1.5},
        {"prompt": "x", "temperature": "0.5"},
        {"prompt": "x", "stop": [""]},
    ],
)
def test_request_schemas_refuse_what_the_server_refuses(body: dict[str, Any]) -> None:
    document = openapi_document(RequestLimits.defaults(), auth=False)
    assert not validator(document, "CompletionRequest").is_valid(body)


def test_the_configured_limits_are_the_schemas_maxima() -> None:
    limits = RequestLimits(
        max_stop_strings=3,
        max_stop_string_chars=4,
        max_stop_token_ids=2,
        max_n=1,
        max_batch_prompts=2,
        max_top_k=50,
        max_logprobs=5,
        max_chat_messages=6,
        max_prompt_chars=7,
    )
    document = openapi_document(limits, auth=False)
    completion = validator(document, "CompletionRequest")
    assert completion.is_valid({"prompt": ["x" * 7, "y"]}) and completion.is_valid({"prompt": [[1], [2, 3]]})
    assert completion.is_valid({"prompt": "x" * 7, "top_k": 50, "logprobs": 5, "stop": ["abcd"] * 3})
    assert completion.is_valid({"prompt": "x", "stop_token_ids": [1, 2]})
    for over in (
        {"prompt": "x" * 8},
        {"top_k": 51},
        {"logprobs": 6},
        {"prompt_logprobs": 6},
        {"stop": ["a"] * 4},
        {"stop": "abcde"},
        {"stop_token_ids": [1, 2, 3]},
        {"n": 2},
        {"prompt": ["a", "b", "c"]},
        {"prompt": [[1], [2], [3]]},
    ):
        assert not completion.is_valid({"prompt": "x"} | over), over
    chat = validator(document, "ChatCompletionRequest")
    assert not chat.is_valid({"messages": USER * 7})
    assert not chat.is_valid({"messages": USER, "top_logprobs": 6})


async def test_real_responses_match_their_schemas() -> None:
    async with running() as h:
        document = (await h.http.get("/openapi.json")).json()
        models = await h.http.get("/v1/models")
        response_validator(document, "/v1/models", "get", 200).validate(models.json())
        card = await h.http.get(f"/v1/models/{models.json()['data'][0]['id']}")
        response_validator(document, "/v1/models/{model}", "get", 200).validate(card.json())
        missing = await h.http.get("/v1/models/nope")
        response_validator(document, "/v1/models/{model}", "get", 404).validate(missing.json())
        for path in ("/health", "/ready", "/version"):
            reply = await h.http.get(path)
            response_validator(document, path, "get", reply.status_code).validate(reply.json())
        refused = await h.http.post("/v1/completions", json={"prompt": "x", "top_k": 10**12})
        response_validator(document, "/v1/completions", "post", 400).validate(refused.json())


async def test_with_an_api_key_v1_needs_a_bearer_token_and_health_names_no_host() -> None:
    async with running(api_key="sk-known") as h:
        document = (await h.http.get("/openapi.json")).json()
        assert document["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        completions = document["paths"]["/v1/completions"]["post"]
        assert completions["security"] == [{"bearerAuth": []}] and "401" in completions["responses"]
        for open_path in ("/health", "/ready", "/version"):
            assert document["paths"][open_path]["get"].get("security") is None
        for guarded in ("/tokenize", "/detokenize"):
            assert document["paths"][guarded]["post"]["security"] == [{"bearerAuth": []}]
        for role in ("tokenizer", "engine", "detokenizer"):
            await h.gateway.transport.beat(Heartbeat(role=role, replica_id=f"{role}-1", time=0.0), ttl_s=5)
        ready = await h.http.get("/ready")
        assert ready.status_code == 200 and "gateway_id" not in ready.json()
        assert "sk-known" not in ready.text and "sk-known" not in str(document)
    async with running() as h:
        assert (await h.http.get("/ready")).json()["gateway_id"] == h.gateway.client.gateway_id
        assert "securitySchemes" not in (await h.http.get("/openapi.json")).json()["components"]


async def test_every_operation_documents_the_request_id_header_it_honours() -> None:
    async with running() as h:
        document = (await h.http.get("/openapi.json")).json()
        for path, item in document["paths"].items():
            for method, operation in item.items():
                [header] = [p for p in operation["parameters"] if p["in"] == "header"]
                assert header["name"] == "X-Request-Id", (path, method)
                for status, response in operation["responses"].items():
                    assert "X-Request-Id" in response["headers"], (path, method, status)
        assert SAFE_ID_PATTERN in header["description"]
        reply = await h.http.get("/health", headers={"X-Request-Id": "trace-42.a:b"})
        assert re.fullmatch(SAFE_ID_PATTERN, "trace-42.a:b") and reply.headers["X-Request-Id"] == "trace-42.a:b"
        reply = await h.http.get("/health", headers={"X-Request-Id": "has space"})  # accepted, id replaced
        assert reply.status_code == 200 and reply.headers["X-Request-Id"] != "has space"
