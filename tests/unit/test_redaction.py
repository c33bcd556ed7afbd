"""shared/redaction.py: URLs shown without their passwords, secrets scrubbed from log records."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from shared.redaction import RedactingFilter, Redactor, install_log_redaction, redact_url, url_secrets
from shared.settings import GatewaySettings, load_settings


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:hunter2@db.internal:6379/0", "redis://:***@db.internal:6379/0"),
        ("rediss://alice:hunter2@db:6380/1", "rediss://alice:***@db:6380/1"),
        ("redis://hunter2@db:6379", "redis://***@db:6379"),
        ("redis://db:6379/0?password=hunter2&socket_timeout=5", "redis://db:6379/0?password=***&socket_timeout=5"),
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://:p%40ss@db:6379", "redis://:***@db:6379"),
        ("redis://:p@ss@db:6379", "redis://:***@db:6379"),  # an unencoded @ in the password
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_an_unparseable_url_is_hidden_whole() -> None:
    assert "hunter2" not in redact_url("redis://:hunter2@[::1")


def test_url_secrets_lists_the_password_as_written_and_decoded() -> None:
    assert url_secrets("redis://:p%40ss@db:6379") == ["p%40ss", "p@ss"]
    assert url_secrets("redis://db/0?password=x1") == ["x1"]
    assert url_secrets("redis://db:6379") == [] and url_secrets(None) == []


def test_redactor_scrubs_urls_in_prose_and_known_secrets() -> None:
    redact = Redactor(["sk-123", "sk-123456"])
    text = "connecting to 'redis://:pw@db:1/0' with key sk-123456 (also sk-123)"
    assert redact(text) == "connecting to 'redis://:***@db:1/0' with key *** (also ***)"
    assert Redactor([""])("nothing to do") == "nothing to do"


def test_settings_name_their_secrets_and_keep_them_out_of_repr() -> None:
    settings = GatewaySettings(redis_url="redis://:pw-1@db:6379/0", api_key="sk-abc")
    assert set(settings.secrets()) == {"pw-1", "sk-abc"}
    assert "pw-1" not in repr(settings) and "sk-abc" not in repr(settings)
    assert "sk-abc" not in str(settings.model_dump())


@pytest.fixture
def scrubbed_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(Redactor(["sk-abc"])))
    logger = logging.getLogger("test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_the_filter_scrubs_messages_arguments_and_tracebacks(scrubbed_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = scrubbed_log
    logger.error("using %s with key %s", "redis://:pw@db:6379", "sk-abc")
    try:
        raise ConnectionError("cannot reach redis://u:pw@db:6379 (key sk-abc)")
    except ConnectionError:
        logger.exception("failed")
    logged = stream.getvalue()
    assert "redis://:***@db:6379" in logged and "redis://u:***@db:6379" in logged
    assert "pw@" not in logged and "sk-abc" not in logged
    assert "Traceback" in logged and "ConnectionError" in logged


def test_install_scrubs_root_handlers_and_uncaught_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    previous_hook = sys.excepthook
    try:
        install_log_redaction(["sk-abc"])
        logging.getLogger("uvicorn.error").warning("child logger with sk-abc")
        try:
            raise RuntimeError("boom sk-abc")
        except RuntimeError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    finally:
        root.removeHandler(handler)
        sys.excepthook = previous_hook
    assert stream.getvalue() == "child logger with ***\n"
    err = capsys.readouterr().err
    assert "RuntimeError: boom ***" in err and "sk-abc" not in err


def test_a_bad_secret_setting_is_named_but_never_echoed() -> None:
    with pytest.raises(SystemExit) as stopped:
        load_settings(GatewaySettings, api_key=987654321, max_n=500)
    message = str(stopped.value)
    assert "SCALELLM_API_KEY" in message and "987654321" not in message
    assert "SCALELLM_MAX_N" in message and "(got 500)" in message  # other settings still show what they got
