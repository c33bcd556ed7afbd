"""Request fields the server does not know: ignored, as vLLM ignores them, but said once in the log.

A client sending an option this server lacks (a newer OpenAI field, another server's
extension) gets an answer without it; the operator learns of it from one warning per
field name and endpoint, not one per request. The names remembered are bounded, so a
client sending a new name with every request cannot grow the gateway or flood its log.

``TracksUnknownFields`` is the base of every request model (protocol.py): it notes the keys
of a JSON object that are not fields, at every level (``messages[].name``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, PrivateAttr, model_validator

log = logging.getLogger("services.gateway")

MAX_NAMES = 256


class TracksUnknownFields(BaseModel):
    _unknown: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _note_unknown(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        if isinstance(data, dict) and isinstance(result, TracksUnknownFields):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            result._unknown = frozenset(str(key) for key in data if key not in known)
        return result

    def unknown_fields(self, prefix: str = "") -> list[str]:
        """Dotted names of every unknown field in this object and the objects it holds, sorted."""
        found = [prefix + name for name in self._unknown]
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, TracksUnknownFields):
                found += value.unknown_fields(f"{prefix}{name}.")
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, TracksUnknownFields):
                        found += item.unknown_fields(f"{prefix}{name}[].")
        return sorted(set(found))


class UnknownFieldLog:
    """Warns once per (endpoint, field name); remembers at most ``max_names`` of them."""

    def __init__(self, logger: logging.Logger = log, *, max_names: int = MAX_NAMES) -> None:
        self._log = logger
        self._max_names = max_names
        self._seen: set[tuple[str, str]] = set()
        self._full = False

    def report(self, endpoint: str, names: Iterable[str]) -> None:
        for name in names:
            key = (endpoint, name)
            if key in self._seen:
                continue
            if len(self._seen) >= self._max_names:
                if not self._full:
                    self._full = True
                    self._log.warning(
                        "%d unknown request fields logged; further ones are ignored without a word", self._max_names
                    )
                return
            self._seen.add(key)
            # repr(): a client's field name may hold anything, a newline included.
            self._log.warning("%s: ignoring the unknown request field %r (logged once per field)", endpoint, name[:100])
