"""The wire format under generated input, without Redis: every message type round-trips, and any
bytes decode to one of the known messages or raise MessageError, never anything else."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import MESSAGE_TYPES, Message, MessageError, decode, encode
from tests.fuzz.strategies import hostile_payloads, messages, model_strategy

EXAMPLES = int(os.environ.get("SCALELLM_FUZZ_EXAMPLES", "200"))


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_every_message_type_round_trips(tag: str) -> None:
    cls = MESSAGE_TYPES[tag]

    @given(model_strategy(cls))
    @settings(max_examples=EXAMPLES)
    def round_trip(message: Message) -> None:
        payload = encode(message)
        decoded = decode(payload)
        assert type(decoded) is cls and decoded == message
        assert encode(decoded) == payload  # one encoding per message: safe to compare or dedupe by bytes

    round_trip()


def decodes_or_refuses(payload: bytes) -> Message | None:
    """The message, or None for a MessageError; any other exception fails the test."""
    try:
        message = decode(payload)
    except MessageError:
        return None
    assert type(message) in MESSAGE_TYPES.values()
    # What decodes can be published again (dead-lettering re-encodes a poisoned message); compared
    # as bytes, since a NaN field never equals itself.
    payload = encode(message)
    assert encode(decode(payload)) == payload
    return message


@given(st.binary(max_size=500))
@settings(max_examples=EXAMPLES * 5)
def test_random_bytes_decode_to_a_message_or_message_error(payload: bytes) -> None:
    decodes_or_refuses(payload)


@given(hostile_payloads())
@settings(max_examples=EXAMPLES)
def test_hostile_payloads_decode_to_a_message_or_message_error(payload: bytes) -> None:
    decodes_or_refuses(payload)


@given(messages())
@settings(max_examples=EXAMPLES)
def test_a_message_with_its_tag_changed_is_another_valid_message_or_refused(message: Message) -> None:
    fields = msgpack.unpackb(encode(message))
    for tag in MESSAGE_TYPES:
        decodes_or_refuses(msgpack.packb(fields | {"type": tag}))
    assert decodes_or_refuses(msgpack.packb(fields | {"type": "pickle"})) is None
    assert decodes_or_refuses(msgpack.packb({k: v for k, v in fields.items() if k != "type"})) is None


@pytest.mark.parametrize("token_id", [-1, 2**31, 2**40])
def test_a_token_id_outside_int32_is_undecodable(token_id: int) -> None:
    # Engines checkpoint output ids as int32; such an id from the wire crashed the one that packed it.
    request = {"type": "tokenized_request", "request_id": "r", "gateway_id": "g", "deadline": 0.0}
    request |= {"prompt_token_ids": [1, token_id], "sampling": {}, "detokenize": {}}
    with pytest.raises(MessageError, match="prompt_token_ids.1"):
        decode(msgpack.packb(request))
    delta = {"request_id": "r", "gateway_id": "g", "offset": 0, "token_ids": [token_id], "prompt_tokens": 1}
    with pytest.raises(MessageError, match="token_ids"):
        decode(msgpack.packb({"type": "engine_step_output", "engine_id": "e", "step": 1, "deltas": [delta]}))
