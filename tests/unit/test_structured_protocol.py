"""The gateway's structured-output fields (issue 10): what becomes SamplingParams.structured, what is a 400."""

from __future__ import annotations

import json

import pytest

from services.gateway.errors import ApiError
from services.gateway.protocol import parse_chat, parse_completion
from services.gateway.to_pipeline import sampling_params

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _chat(**fields: object) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


def test_each_form_becomes_one_constraint() -> None:
    schema = {"type": "object"}
    cases = [
        ({"response_format": {"type": "json_object"}}, "json_object", True),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
            "json_schema",
            json.dumps(schema),
        ),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "[0-9]+"),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", ["a", "b"]),
        ({"guided_json": schema}, "json_schema", json.dumps(schema)),
        ({"guided_grammar": 'start: "a"'}, "grammar", 'start: "a"'),
    ]
    for fields, attribute, expected in cases:
        structured = sampling_params(parse_chat(_chat(**fields)), None).structured
        assert structured is not None and getattr(structured, attribute) == expected
    completion = parse_completion(json.dumps({"prompt": "x", "guided_choice": ["y", "n"]}).encode())
    assert sampling_params(completion, None).structured is not None
    assert sampling_params(parse_chat(_chat()), None).structured is None


def test_two_constraints_or_a_malformed_one_are_400() -> None:
    with pytest.raises(ApiError) as two:
        parse_chat(_chat(guided_regex="a", response_format={"type": "json_object"}))
    assert two.value.status == 400 and "at most one" in str(two.value.message)
    for fields in (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format": {"type": "yaml"}},
        {"guided_choice": []},
        {"guided_json": "{"},
    ):
        with pytest.raises(ApiError):
            parse_chat(_chat(**fields))
