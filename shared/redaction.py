"""Keeping secrets out of logs: the Redis password and the API key.

``SCALELLM_REDIS_URL`` carries the Redis password (``redis://user:pw@host``, or
``?password=pw``; for Sentinel also ``?sentinel_password=pw``, docs/redis.md), and
the URL is the thing most likely to be logged whole, so
``redact_url`` is the one helper for showing a URL to a person. ``Redactor``
also scrubs free text: every URL in it, and the literal secrets it was given.
``install_log_redaction`` puts a Redactor on every log record and on uncaught
exceptions, as a backstop for messages no code here wrote (a library's
exception text, a traceback).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterable
from types import TracebackType
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

MASK = "***"
# Query parameters that carry credentials (redis-py reads ``password``, shared/redis_client.py
# ``sentinel_password``; the others are what other clients and proxies use).
_SECRET_PARAMETERS = frozenset(
    {"password", "sentinel_password", "pass", "pwd", "secret", "token", "key", "api_key", "apikey", "auth"}
)
# scheme://rest-of-url, up to whitespace or a quote or bracket that ends it in prose or repr().
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()\[\]{}]+")


def redact_url(url: str) -> str:
    """The URL with its password (userinfo or query) replaced by ``***``; the user name stays.

    A user name without a colon is masked too: some clients read ``redis://secret@host``
    as a password.
    """
    if "://" not in url:  # not a URL; "user:pw@host" at most
        return f"{MASK}@{url.rsplit('@', 1)[1]}" if "@" in url else url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{host}" if has_password else f"{MASK}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(name.lower() in _SECRET_PARAMETERS for name, _ in pairs):
                masked = [(name, MASK if name.lower() in _SECRET_PARAMETERS else value) for name, value in pairs]
                query = urlencode(masked, safe="*")
        # Assembled by hand: urlunsplit drops the empty host of unix:///path.
        return (
            f"{parts.scheme}://{netloc}{parts.path}"
            + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else "")
        )
    except ValueError:  # e.g. an unbalanced IPv6 bracket: show nothing of it
        return f"<unparseable URL: {MASK}>"


def url_secrets(url: str | None) -> list[str]:
    """The secrets inside a URL, as written and percent-decoded (either form may end up in a message)."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        found.append(password if has_password else user)
    found += [value for name, value in parse_qsl(parts.query) if name.lower() in _SECRET_PARAMETERS]
    found += [unquote(value) for value in found]
    return [value for value in dict.fromkeys(found) if value]


class Redactor:
    """Scrubs text: credentials in every URL, then each known secret wherever it appears."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if "://" in text:
            text = _URL.sub(lambda match: redact_url(match.group(0)), text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


class RedactingFilter(logging.Filter):
    """A handler filter that rewrites each record's message, traceback and stack with a Redactor."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatted here, so the handler's formatter uses this scrubbed text instead.
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        return True


def install_log_redaction(secrets: Iterable[str] = ()) -> Redactor:
    """Scrub every record the root logger's handlers emit, and tracebacks of uncaught exceptions.

    A filter on the handlers, not on a logger: logger filters do not see records
    propagated from child loggers (uvicorn's, redis-py's, ours).
    """
    redactor = Redactor(secrets)
    log_filter = RedactingFilter(redactor)
    for handler in logging.getLogger().handlers:
        handler.addFilter(log_filter)

    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        sys.stderr.write(redactor("".join(traceback.format_exception(kind, value, tb))))

    sys.excepthook = excepthook
    return redactor
