"""Constrained decoding in EngineCore (issue 10): masks from llguidance applied by the sampler,
on the fake runner with the default model's vocabulary, so the constraint alone decides validity."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from services.engine.contract import EngineRequest
from services.engine.core.engine_core import EngineCore, EngineCoreConfig
from services.engine.structured import GrammarCompiler
from shared.messages import SamplingParams, StructuredOutputs
from shared.structured import InvalidConstraint, grammar_text
from tests.fakes.engine_core import FakeRunner, reference_greedy, run

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    compiler = GrammarCompiler.for_model(lambda: tokenizer, VOCAB, [EOS])
    # As the engine does before it serves: a step's mask kernel compiled beside the warm-up's (two
    # first torch.compile calls at once) failed a CI run on a half-written precompiled header.
    compiler.wait_ready(timeout=120)
    return compiler


def _core(compiler: GrammarCompiler | None, num_blocks: int = 256) -> EngineCore:
    config = EngineCoreConfig(
        num_blocks=num_blocks,
        block_size=4,
        vocab_size=VOCAB,
        max_model_len=1024,
        max_num_batched_tokens=64,
        max_running_requests=16,
        default_eos_token_ids=[EOS],
        sampler_seed=0,
    )
    return EngineCore(FakeRunner(num_blocks, 4, VOCAB), config, grammars=compiler)


def _request(request_id: str, constraint: StructuredOutputs | None, **sampling: Any) -> EngineRequest:
    fields: dict[str, Any] = {"max_tokens": 40, "temperature": 0.0, **sampling}
    params = SamplingParams(structured=constraint, **fields)
    return EngineRequest(request_id, [5, 6, 7, 8], params)


@pytest.mark.parametrize("overlap", [True, False], ids=["fill-during-forward", "fill-before-forward"])
def test_regex_choice_and_schema_outputs_match(compiler: GrammarCompiler, tokenizer: Any, overlap: bool) -> None:
    core = _core(compiler)
    assert core.mask_filler is not None
    core.mask_filler.overlap = overlap
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    core.add_request(_request("regex", StructuredOutputs(regex="[0-9]{3}")))
    core.add_request(_request("choice", StructuredOutputs(choice=["yes", "no"])))
    core.add_request(_request("json", StructuredOutputs(json=json.dumps(schema)), temperature=1.0, seed=3))
    core.add_request(_request("free", None))
    results = run(core)
    text = {rid: tokenizer.decode([t for t in tokens if t != EOS]) for rid, (tokens, _, _) in results.items()}
    assert re.fullmatch("[0-9]{3}", text["regex"])
    assert text["choice"] in ("yes", "no")
    assert isinstance(json.loads(text["json"])["n"], int)
    assert results["regex"][1] == "stop" and results["choice"][1] == "stop"
    # Unconstrained alongside: untouched, the fake model's own greedy answer.
    assert results["free"] == ([*reference_greedy([5, 6, 7, 8], 40, {EOS}, VOCAB)], "length", results["free"][2])


def test_takeover_refeeds_checkpointed_tokens(compiler: GrammarCompiler, tokenizer: Any) -> None:
    core = _core(compiler)
    done = tokenizer.encode("12", add_special_tokens=False)
    params = SamplingParams(max_tokens=40, temperature=0.0, structured=StructuredOutputs(regex="[0-9]{5}"))
    core.add_request(EngineRequest("t", [5, 6, 7], params, list(done)))
    tokens, reason, _ = run(core)["t"]
    assert re.fullmatch("[0-9]{5}", tokenizer.decode([*done, *[t for t in tokens if t != EOS]]))
    assert reason == "stop"


def test_engine_without_compiler_refuses_constrained_requests() -> None:
    core = _core(None)
    core.add_request(_request("r", StructuredOutputs(regex="a")))
    _, reason, outputs = run(core)["r"]
    assert reason == "error" and "structured outputs" in (outputs[-1].error or "")


def test_invalid_constraints_are_named() -> None:
    with pytest.raises(InvalidConstraint, match="exactly one"):
        grammar_text(StructuredOutputs(regex="a", choice=["a"]))
    with pytest.raises(InvalidConstraint, match="not JSON"):
        grammar_text(StructuredOutputs(json="{", param="response_format"))


def test_tokenizer_stage_refuses_an_invalid_schema_with_400(tokenizer: Any) -> None:
    from services.tokenizer.prompt import PromptProcessor
    from shared.messages import CompletionRequest, RequestFailed, TokenizedRequest, decode, encode

    processor = PromptProcessor(tokenizer, max_model_len=64, eos_token_ids=[EOS])
    bad = StructuredOutputs(json='{"type": "foo"}', param="response_format")
    sampling = SamplingParams(max_tokens=8, structured=bad)
    request = CompletionRequest(request_id="r", gateway_id="g", deadline=1e12, prompt="hi", sampling=sampling)
    refused = processor.process(decode(encode(request)))  # type: ignore[arg-type]
    assert isinstance(refused, RequestFailed) and refused.status == 400
    assert refused.param == "response_format" and "foo" in refused.message
    request.sampling.structured = StructuredOutputs(regex="[a-z]+")
    accepted = processor.process(request)
    assert isinstance(accepted, TokenizedRequest) and accepted.sampling.structured == request.sampling.structured
