"""Hypothesis strategies for the wire: valid messages built from their pydantic models, and hostile bytes.

``message_strategy`` reads each model's fields (types, ``ge``/``gt``/``le``/``lt`` bounds, Literals,
nested models) so a field added to shared/messages.py is generated without touching this file.
Integers without bounds stay within the 64 bits msgpack carries: a message class accepts larger
ones, but no producer makes them (the gateway refuses them from clients).
"""

from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types
import msgpack
from hypothesis import strategies as st
from pydantic import BaseModel

from shared.messages import MESSAGE_TYPES, Message, encode

INT64 = (-(2**63), 2**63 - 1)
MAX_LIST = 4


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for item in metadata:
        for constraint in getattr(item, "metadata", [item]):  # a FieldInfo nested in Annotated, or constraints
            if isinstance(constraint, annotated_types.Ge):
                bounds["ge"] = constraint.ge
            elif isinstance(constraint, annotated_types.Gt):
                bounds["gt"] = constraint.gt
            elif isinstance(constraint, annotated_types.Le):
                bounds["le"] = constraint.le
            elif isinstance(constraint, annotated_types.Lt):
                bounds["lt"] = constraint.lt
    return bounds


def _integers(bounds: dict[str, Any]) -> st.SearchStrategy[int]:
    low = bounds["ge"] if "ge" in bounds else bounds["gt"] + 1 if "gt" in bounds else INT64[0]
    high = bounds["le"] if "le" in bounds else bounds["lt"] - 1 if "lt" in bounds else INT64[1]
    return st.integers(low, high)


def _floats(bounds: dict[str, Any]) -> st.SearchStrategy[float]:
    # NaN never equals itself, so a round trip could not be compared; every other float is fair.
    return st.floats(
        min_value=bounds.get("ge", bounds.get("gt")),
        max_value=bounds.get("le", bounds.get("lt")),
        exclude_min="gt" in bounds,
        exclude_max="lt" in bounds,
        allow_nan=False,
    )


def value_strategy(annotation: Any, metadata: list[Any] | None = None) -> st.SearchStrategy[Any]:
    """Values a pydantic field of this annotation accepts (and that msgpack can carry)."""
    metadata = list(metadata or [])
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        return value_strategy(inner, metadata + extra)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return _integers(_bounds(metadata))
    if annotation is float:
        return _floats(_bounds(metadata))
    if annotation is str:
        return st.text(max_size=40)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return st.one_of([value_strategy(arm) for arm in typing.get_args(annotation)])
    if origin is list:
        (item,) = typing.get_args(annotation)
        return st.lists(value_strategy(item), max_size=MAX_LIST)
    if origin is tuple:
        return st.tuples(*(value_strategy(item) for item in typing.get_args(annotation)))
    if origin is dict:
        key, value = typing.get_args(annotation)
        return st.dictionaries(value_strategy(key), value_strategy(value), max_size=MAX_LIST)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_strategy(annotation)
    raise NotImplementedError(f"no strategy for {annotation!r}: extend tests/fuzz/strategies.py")


def model_strategy(cls: type[BaseModel], **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Instances of ``cls``: every required field, and any subset of the optional ones; ``overrides``
    replace the strategies of the fields they name (say, a deadline that has not passed yet)."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in cls.model_fields.items():
        strategy = overrides[name] if name in overrides else value_strategy(field.annotation, field.metadata)
        (required if field.is_required() else optional)[name] = strategy
    return st.fixed_dictionaries(required, optional=optional).map(lambda fields: cls.model_validate(fields))


def messages() -> st.SearchStrategy[Message]:
    """Any top-level message, of every type in the wire's tag table."""
    return st.one_of([model_strategy(cls) for cls in MESSAGE_TYPES.values()])


# Anything msgpack can hold, nested: what a confused or hostile producer could write.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
msgpack_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def hostile_payloads(draw: st.DrawFn) -> bytes:
    """Bytes for a stream entry's payload: random, msgpack of the wrong shape, a known tag with bad
    fields, a valid message cut short or with a byte changed, or a valid message."""
    kind = draw(st.sampled_from(["bytes", "value", "tagged", "mutated", "valid"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "value":
        return bytes(msgpack.packb(draw(msgpack_values), use_bin_type=True))
    if kind == "tagged":
        fields = draw(st.dictionaries(st.text(max_size=12), msgpack_values, max_size=6))
        fields["type"] = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
        return bytes(msgpack.packb(fields, use_bin_type=True))
    payload = encode(draw(messages()))
    if kind == "valid":
        return payload
    index = draw(st.integers(0, len(payload) - 1))
    if draw(st.booleans()):
        return payload[:index]
    return payload[:index] + bytes([draw(st.integers(0, 255))]) + payload[index + 1 :]
