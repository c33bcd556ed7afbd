"""API keys: ``SCALELLM_API_KEY`` and ``SCALELLM_API_KEYS`` (several, comma-separated). Pure logic.

A request is let in when its ``Authorization: Bearer <token>`` matches any configured key.
Keys are kept only as SHA-256 digests, and every digest is compared, in constant time,
whichever matches (as vLLM does), so neither the time taken nor the process's memory tells
a key or which one was used. Which routes need a key is the caller's choice (server.py:
everything but /health, /ready, /version, /metrics and /openapi.json).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.requests import HTTPConnection

from services.gateway.errors import unauthorized
from shared.settings import GatewaySettings


class ApiKeys:
    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in dict.fromkeys(keys) if key]

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ApiKeys:
        return cls(settings.api_key_values())

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header's value carries one of the keys (always True without keys)."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(digest, known)
        return matched and scheme.lower() == "bearer"

    def authorize(self, connection: HTTPConnection) -> None:
        """Raises the 401 ApiError unless the request carries a key."""
        if not self.accepts(connection.headers.get("authorization")):
            raise unauthorized()
