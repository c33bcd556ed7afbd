"""Constrained requests across preemption and engine takeover (issue 10).

On the fake runner with the default model's vocabulary: its logits are noise that depends on the
whole context read back from the KV blocks, so only the masks make an answer valid, and a matcher
that loses its place (a preempted sequence recomputed, a request resumed on another engine from its
checkpointed output tokens) shows up as an invalid answer or one that differs from the
uninterrupted run. Several different constraints share each batch, so masks given to the wrong
row show up too.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from services.engine.contract import EngineRequest
from services.engine.core.engine_core import EngineCore, EngineCoreConfig
from services.engine.structured import GrammarCompiler
from shared.messages import SamplingParams, StructuredOutputs
from tests.fakes.engine_core import FakeRunner, assert_all_blocks_free, random_prompts, run

VOCAB = 49152
EOS = 2
MAX_TOKENS = 80

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "pattern": "^[a-z]{4,12}$"},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "ok"],
    "additionalProperties": False,
}
# What each kind of constraint must produce, checked on the decoded answer.
CONSTRAINTS: dict[str, tuple[StructuredOutputs, str]] = {
    "digits": (StructuredOutputs(regex="[0-9]{20}-[0-9]{20}"), "[0-9]{20}-[0-9]{20}"),
    "words": (StructuredOutputs(regex="[a-z]{6}( [a-z]{6}){9}"), "[a-z]{6}( [a-z]{6}){9}"),
    "json": (StructuredOutputs(json=json.dumps(SCHEMA)), ""),
    "choice": (StructuredOutputs(choice=["alpha beta gamma", "delta epsilon"]), "alpha beta gamma|delta epsilon"),
}


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    compiler = GrammarCompiler.for_model(lambda: tokenizer, VOCAB, [EOS])
    # As the engine does before it serves: a step's mask kernel compiled beside the warm-up's (two
    # first torch.compile calls at once) failed a CI run on a half-written precompiled header.
    compiler.wait_ready(timeout=120)
    return compiler


def _core(compiler: GrammarCompiler, num_blocks: int = 512, max_num_batched_tokens: int = 64) -> EngineCore:
    config = EngineCoreConfig(
        num_blocks=num_blocks,
        block_size=4,
        vocab_size=VOCAB,
        max_model_len=1024,
        max_num_batched_tokens=max_num_batched_tokens,
        max_running_requests=16,
        default_eos_token_ids=[EOS],
        sampler_seed=0,
    )
    return EngineCore(FakeRunner(num_blocks, 4, VOCAB), config, grammars=compiler)


def _params(kind: str, **sampling: Any) -> SamplingParams:
    fields: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **sampling}
    return SamplingParams(structured=CONSTRAINTS[kind][0], **fields)


def _assert_valid(kind: str, tokens: list[int], tokenizer: Any) -> None:
    text = tokenizer.decode([t for t in tokens if t != EOS])
    if kind == "json":
        value = json.loads(text)
        assert set(value) == {"id", "name", "ok"}, text
        assert isinstance(value["id"], int) and re.fullmatch("[a-z]{4,12}", value["name"]), text
        assert isinstance(value["ok"], bool), text
    else:
        assert re.fullmatch(CONSTRAINTS[kind][1], text), (kind, text)


def _add_batch(core: EngineCore, count: int) -> dict[str, str]:
    """``count`` constrained requests, the kinds in turn; returns request id -> kind."""
    kinds = list(CONSTRAINTS)
    ids: dict[str, str] = {}
    for i, prompt in enumerate(random_prompts(count, 10, 30, seed=21)):
        kind = kinds[i % len(kinds)]
        core.add_request(EngineRequest(f"r{i}", prompt, _params(kind)))
        ids[f"r{i}"] = kind
    return ids


def test_preempted_constrained_sequences_are_recomputed_into_the_same_valid_answers(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    roomy = _core(compiler)
    kinds = _add_batch(roomy, 12)
    reference = run(roomy)
    assert roomy.scheduler.num_preemptions == 0

    # 24 blocks of 4 tokens: 12 requests of 10-30 prompt tokens and up to 42 output tokens each
    # cannot all run at once, so the newest are preempted (most with output tokens already),
    # recomputed and resumed.
    tight = _core(compiler, num_blocks=24, max_num_batched_tokens=32)
    _add_batch(tight, 12)
    results = run(tight)
    assert tight.scheduler.num_preemptions >= 5
    for request_id, kind in kinds.items():
        tokens, reason, _ = results[request_id]
        assert reason == "stop", (request_id, kind)
        _assert_valid(kind, tokens, tokenizer)
        # Greedy on the same context: a recomputed sequence's matcher is where it was.
        assert tokens == reference[request_id][0], (request_id, kind)
    assert_all_blocks_free(tight)


def _crowd(core: EngineCore) -> None:
    """Other requests in the same batches: constrained ones and a free one."""
    for i, prompt in enumerate(random_prompts(3, 5, 20, seed=5)):
        kind = list(CONSTRAINTS)[i]
        core.add_request(EngineRequest(f"other{i}", prompt, _params(kind, temperature=1.0)))
    core.add_request(EngineRequest("free", [9, 8, 7], SamplingParams(max_tokens=30, temperature=1.0)))


PROMPT = [11, 42, 7, 99, 3, 58, 21]


SEEDED = {"temperature": 1.0, "seed": 77}


@pytest.mark.parametrize(
    ("kind", "sampling"),
    [("json", {}), ("json", SEEDED), ("digits", SEEDED), ("words", {})],
    ids=["json-greedy", "json-seeded", "digits-seeded", "words-greedy"],
)
def test_a_constrained_request_taken_over_finishes_as_the_uninterrupted_run(
    compiler: GrammarCompiler, tokenizer: Any, kind: str, sampling: dict[str, Any]
) -> None:
    params = _params(kind, **sampling)
    first = _core(compiler)
    _crowd(first)
    first.add_request(EngineRequest("r", PROMPT, params))
    full, reason, _ = run(first)["r"]
    assert reason == "stop" and full[-1] == EOS
    _assert_valid(kind, full, tokenizer)
    # Cut anywhere, down to just before the end of text (the answer is complete there).
    for cut in sorted({1, 2, len(full) // 3, len(full) // 2, len(full) - 2, len(full) - 1}):
        second = _core(compiler, max_num_batched_tokens=8)  # another replica; prefilled in chunks
        _crowd(second)
        second.add_request(EngineRequest("r", PROMPT, params, output_token_ids=full[:cut]))
        tokens, reason, _ = run(second)["r"]
        assert (full[:cut] + tokens, reason) == (full, "stop"), cut
        assert_all_blocks_free(second)
