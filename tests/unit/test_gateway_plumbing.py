"""The pure parts of issue 9 item 5: request ids, the access line, API keys, unknown fields, calls,
and the settings behind them."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.gateway.auth import ApiKeys
from services.gateway.registry import RegistryClosed, RegistryFull, RequestRegistry
from services.gateway.request_context import RequestRecord, client_request_id, logfmt
from services.gateway.unknown_fields import UnknownFieldLog
from shared.messages import RequestFailed, TokenizeResult
from shared.settings import GatewaySettings, load_settings


@pytest.mark.parametrize("value", ["a", "req-1", "0f3c.a:b_c-d", "x" * 128])
def test_safe_client_request_ids_are_kept(value: str) -> None:
    assert client_request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "x" * 129, "a b", "a\nb", "ü", "a/b", "a;b", "{a}"])
def test_unsafe_client_request_ids_are_refused(value: str | None) -> None:
    assert client_request_id(value) is None


def test_a_clients_id_gets_a_unique_pipeline_id_and_a_generated_one_is_used_as_it_is() -> None:
    client = RequestRecord("abc", True, "POST", "/v1/completions", 0.0)
    first, second = client.pipeline_id("cmpl-"), client.pipeline_id("cmpl-")
    assert first != second and first.startswith("cmpl-abc-") and len(first) == len("cmpl-abc-") + 12
    assert RequestRecord("f00d", False, "GET", "/", 0.0).pipeline_id("tokn-") == "tokn-f00d"


def test_the_access_line_is_logfmt_that_a_path_cannot_forge() -> None:
    record = RequestRecord("r1", False, "GET", '/x y"\nstatus=200', started=10.0, status=404, first_output_at=10.25)
    line = logfmt(record.fields(now=10.5))
    assert line == (
        'request_id=r1 method=GET path="/x y\\"\\nstatus=200" status=404 prompt_tokens=- completion_tokens=- '
        "ttft_ms=250.0 latency_ms=500.0"
    )
    assert "\n" not in line and logfmt({"k": ""}) == 'k=""' and logfmt({"k": "é"}) == 'k="\\u00e9"'


def test_api_keys_accept_any_configured_key_and_only_as_bearer() -> None:
    keys = ApiKeys(["one", "two", "one", ""])
    assert keys.enabled
    assert keys.accepts("Bearer one") and keys.accepts("bearer two") and keys.accepts("Bearer  two ")
    assert not keys.accepts("Bearer three") and not keys.accepts("Basic one") and not keys.accepts(None)
    assert not keys.accepts("Bearer") and not keys.accepts("one")
    assert ApiKeys([]).accepts(None) and not ApiKeys([""]).enabled


def test_api_keys_come_from_both_settings_and_stay_secret() -> None:
    settings = GatewaySettings(api_key="k1", api_keys=" k2 ,k3,, k1 ")
    assert settings.api_key_values() == ["k1", "k2", "k3"]
    assert set(settings.secrets()) >= {"k1", "k2", "k3"}
    assert "k2" not in repr(settings)
    assert GatewaySettings(api_keys="only").api_key_values() == ["only"]


def test_bad_settings_stop_start_up_naming_them_without_quoting_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALELLM_API_KEYS", " , ,")
    with pytest.raises(SystemExit) as exit_info:
        load_settings(GatewaySettings)
    assert "SCALELLM_API_KEYS" in str(exit_info.value) and " , ," not in str(exit_info.value)
    monkeypatch.delenv("SCALELLM_API_KEYS")
    monkeypatch.setenv("SCALELLM_CORS_ALLOW_ORIGINS", "*")
    monkeypatch.setenv("SCALELLM_CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(SystemExit) as exit_info:
        load_settings(GatewaySettings)
    assert "SCALELLM_CORS_ALLOW_CREDENTIALS" in str(exit_info.value)
    monkeypatch.setenv("SCALELLM_DEFAULT_MAX_TOKENS", "0")
    with pytest.raises(SystemExit, match="SCALELLM_DEFAULT_MAX_TOKENS"):
        load_settings(GatewaySettings)


def test_unknown_fields_are_logged_once_each_and_the_names_kept_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    log = UnknownFieldLog(logging.getLogger("test.unknown"), max_names=3)
    with caplog.at_level(logging.WARNING, logger="test.unknown"):
        log.report("/a", ["x", "y"])
        log.report("/a", ["x"])
        log.report("/b", ["x"])  # another endpoint: its own line
        log.report("/a", ["z", "w"])
        log.report("/a", ["v"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4 and "further ones are ignored" in messages[-1]
    assert messages[0] == "/a: ignoring the unknown request field 'x' (logged once per field)"


def test_a_call_gets_its_one_answer_and_counts_towards_capacity() -> None:
    async def scenario() -> None:
        registry = RequestRegistry(capacity=2)
        call = registry.open_call("tokn-1")
        registry.open("cmpl-1")
        with pytest.raises(RegistryFull):
            registry.open_call("tokn-2")
        assert registry.release("cmpl-1")
        with pytest.raises(ValueError):  # already in flight
            registry.open_call("tokn-1")
        answer = TokenizeResult(request_id="tokn-1", tokens=[1], max_model_len=8)
        assert registry.dispatch(answer) == 1 and await call == answer
        assert registry.dispatch(answer) == 0  # a repeat is dropped
        assert registry.release("tokn-1") and len(registry) == 0
        failed = registry.open_call("tokn-3")
        error = RequestFailed(request_id="tokn-3", status=400, error_type="invalid_request_error", message="no")
        registry.dispatch(error)
        assert (await failed) == error
        registry.release("tokn-3")
        waiting = registry.open_call("tokn-4")
        ids = registry.close(
            lambda rid: RequestFailed(request_id=rid, status=503, error_type="server_error", message="bye")
        )
        assert ids == [] and (await waiting).status == 503  # ended, but nothing to abort in the engines
        with pytest.raises(RegistryClosed):
            registry.open_call("tokn-5")

    asyncio.run(scenario())
