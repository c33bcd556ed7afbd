"""Structured outputs (issue 10): a ``StructuredOutputs`` constraint as an llguidance grammar.

Shared by the tokenizer stage, which checks that a request's constraint compiles (and refuses it
with a 400 naming the problem), and the engine, which compiles it into matchers. llguidance was
chosen over xgrammar by bench/structured_masks.py (docs/benchmarks.md): a schema compiles in about
a millisecond, so no stage needs a slow-compile cache for correctness, only for repeat work.

Pure logic apart from llguidance itself; no I/O.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf

from shared.messages import StructuredOutputs

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON without free whitespace between tokens: a small model otherwise pads with newlines and
# spaces until max_tokens (the JSON grammar allows any amount), and the answer never ends.
_JSON_DEFAULTS: "JsonCompileOptions" = {"whitespace_flexible": False}
# What {"type": "json_object"} allows: any JSON object.
_ANY_OBJECT = '{"type": "object"}'


class InvalidConstraint(ValueError):
    """A schema, regex, choice list or grammar that does not compile; the message says why."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def grammar_text(constraint: StructuredOutputs) -> str:
    """The llguidance grammar of a constraint (raises InvalidConstraint for malformed input
    that fails before compiling: not exactly one constraint, a schema that is not JSON)."""
    kinds = constraint.kinds()
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none"
        raise InvalidConstraint(
            f"exactly one structured output constraint is allowed (found {found})", constraint.param
        )
    try:
        if constraint.json_schema is not None:
            schema = _json_schema(constraint.json_schema, constraint.param)
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS))
        if constraint.json_object:
            return str(llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_DEFAULTS))
        if constraint.regex is not None:
            return str(llguidance.grammar_from("regex", constraint.regex))
        if constraint.choice is not None:
            if not constraint.choice:
                raise InvalidConstraint("choice must list at least one string", constraint.param)
            return str(llguidance.grammar_from("choice", json.dumps(constraint.choice)))
        # Lark (llguidance's dialect) or GBNF (llama.cpp's), told apart by llguidance.
        return str(llguidance.grammar_from("grammar", constraint.grammar or ""))
    except InvalidConstraint:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidConstraint(f"invalid {kinds[0]}: {exc}", constraint.param) from None


def _json_schema(text: str, param: str | None) -> str:
    try:
        schema: Any = json.loads(text)
    except ValueError as exc:
        raise InvalidConstraint(f"the JSON schema is not JSON: {exc}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidConstraint("a JSON schema must be an object", param)
    return text


def llg_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> llguidance.LLTokenizer:
    """The tokenizer llguidance matches with (once per process: ~0.5 s for 49K tokens).

    ``vocab_size``: the model's (the masks' width; may exceed the tokenizer's). ``eos_token_ids``:
    the tokens that end a request, so that a grammar that is complete lets the model stop.
    """
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids or None)


def check_compiles(tokenizer: llguidance.LLTokenizer, grammar: str, constraint: StructuredOutputs) -> None:
    """Raises InvalidConstraint naming the problem when ``grammar`` does not compile."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        kind = (constraint.kinds() or ["constraint"])[0]
        detail = "; ".join(messages) if messages else "it does not compile"
        raise InvalidConstraint(f"invalid {kind}: {detail}", constraint.param)


def new_matcher(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A matcher at the start of ``grammar`` (compiles it; ~1 ms for a typical schema)."""
    return llguidance.LLMatcher(tokenizer, grammar, log_level=0)
