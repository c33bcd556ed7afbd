"""Structured outputs end to end (issue 10) with the openai package against the real model:
constrained answers of the small default model are always valid; an invalid schema is a 400."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerBase

from tests.integration.harness import Pipeline
from tests.integration.harness import torch_pipeline as start_torch_pipeline

openai = pytest.importorskip("openai")


class City(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0, le=100_000_000)


@pytest.fixture(scope="module")
def pipeline(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    with start_torch_pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")), "structured") as started:
        yield started


def _client(pipeline: Pipeline):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{pipeline.gateway_url}/v1", api_key="none", max_retries=0, timeout=120)


def test_parse_regex_choice_json_object_and_invalid_schema(pipeline: Pipeline) -> None:
    client = _client(pipeline)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Name a large city."}]
    parsed = client.chat.completions.parse(
        model=model, messages=messages, response_format=City, max_tokens=60, temperature=0
    )
    assert isinstance(parsed.choices[0].message.parsed, City)
    regex = client.completions.create(
        model=model, prompt="A number:", max_tokens=10, extra_body={"guided_regex": "[0-9]{4}"}
    )
    assert re.fullmatch("[0-9]{4}", regex.choices[0].text)
    choice = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=10,
        n=2,
        extra_body={"structured_outputs": {"choice": ["Paris", "Tokyo"]}},
    )
    assert all(c.message.content in ("Paris", "Tokyo") for c in choice.choices)
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=60,
        temperature=0,  # drawn at 1.0, a string sometimes ran past max_tokens: cut, not invalid
        stream=True,
        response_format={"type": "json_object"},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=5, extra_body={"guided_json": {"type": "foo"}}
        )
    assert "foo" in str(bad.value)


def test_a_stop_string_ends_a_constrained_answer_early(pipeline: Pipeline) -> None:
    """The stop string cuts the answer mid-constraint; what came before it still follows the
    constraint (a prefix that the rest of a valid answer completes)."""
    client = _client(pipeline)
    model = client.models.list().data[0].id
    # The regex forces a "-" after four digits: the stop string always comes, before the end.
    for stream in (False, True):
        answer = client.completions.create(
            model=model,
            prompt="A number:",
            max_tokens=20,
            stop=["-"],
            stream=stream,
            extra_body={"guided_regex": "[0-9]{4}-[0-9]{4}"},
        )
        choices = [c for chunk in answer for c in chunk.choices] if stream else answer.choices
        text = "".join(c.text for c in choices)
        assert re.fullmatch("[0-9]{4}", text), (stream, text)
        assert choices[-1].finish_reason == "stop"
    # Compact JSON in the schema's order: the name, then this key; cut there, a population completes it.
    city = {"name": "city", "schema": City.model_json_schema(), "strict": True}
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a large city."}],
        max_tokens=60,
        temperature=0,
        stop=[',"population"'],
        response_format={"type": "json_schema", "json_schema": city},
    )
    text = chat.choices[0].message.content or ""
    assert chat.choices[0].finish_reason == "stop", text
    assert City.model_validate_json(text + ',"population":1}').name
