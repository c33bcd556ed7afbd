"""The echo backend: exact token sequences, limits, aborts, load figures."""

from __future__ import annotations

import pytest

from services.engine.backends import BackendUnavailable, create_backend
from services.engine.contract import EngineRequest, RequestOutput
from services.engine.echo import EchoBackend
from shared.messages import SamplingParams, StructuredOutputs
from shared.settings import EngineSettings


def request(request_id: str, prompt: list[int], **sampling: object) -> EngineRequest:
    return EngineRequest(request_id, prompt, SamplingParams(**sampling))


def run_to_end(backend: EchoBackend, max_steps: int = 100) -> dict[str, tuple[list[int], str | None]]:
    """Every request's tokens and finish reason, stepping until all have ended."""
    results: dict[str, tuple[list[int], str | None]] = {}
    for _ in range(max_steps):
        if not backend.has_unfinished():
            return results
        for output in backend.step():
            tokens, _ = results.get(output.request_id, ([], None))
            results[output.request_id] = (tokens + output.new_token_ids, output.finish_reason)
    raise AssertionError("the backend did not finish")


def test_echoes_the_prompt_cyclically_up_to_max_tokens() -> None:
    backend = EchoBackend()
    backend.add_request(request("a", [5, 6, 7], max_tokens=7))
    assert run_to_end(backend) == {"a": ([5, 6, 7, 5, 6, 7, 5], "length")}


def test_one_token_per_step_for_every_running_request() -> None:
    backend = EchoBackend()
    backend.add_request(request("a", [1, 2], max_tokens=3))
    backend.add_request(request("b", [9], max_tokens=2))
    assert backend.step() == [RequestOutput("a", [1]), RequestOutput("b", [9])]
    assert backend.step() == [RequestOutput("a", [2]), RequestOutput("b", [9], "length")]
    assert backend.step() == [RequestOutput("a", [1], "length")]
    assert not backend.has_unfinished()
    assert backend.step() == []


def test_stops_at_a_stop_token_and_includes_it() -> None:
    backend = EchoBackend()
    backend.add_request(request("a", [5, 6, 7, 8], max_tokens=10, stop_token_ids=[7]))
    assert run_to_end(backend) == {"a": ([5, 6, 7], "stop")}


def test_stops_at_eos_unless_ignore_eos() -> None:
    backend = EchoBackend()
    backend.add_request(request("eos", [5, 6, 7], max_tokens=10, eos_token_ids=[6]))
    backend.add_request(request("ignored", [5, 6, 7], max_tokens=5, eos_token_ids=[6], ignore_eos=True))
    # ignore_eos does not silence explicit stop tokens.
    backend.add_request(
        request("stop", [5, 6, 7], max_tokens=10, eos_token_ids=[6], stop_token_ids=[7], ignore_eos=True)
    )
    assert run_to_end(backend) == {
        "eos": ([5, 6], "stop"),
        "ignored": ([5, 6, 7, 5, 6], "length"),
        "stop": ([5, 6, 7], "stop"),
    }


def test_no_stop_before_min_tokens() -> None:
    backend = EchoBackend()
    # 5 is the eos; min_tokens=2 lets it end the request only from the 3rd output token on.
    backend.add_request(request("a", [5, 6, 7], max_tokens=10, eos_token_ids=[5], min_tokens=2))
    assert run_to_end(backend) == {"a": ([5, 6, 7, 5], "stop")}


def test_stop_token_on_the_last_allowed_token_reports_stop() -> None:
    backend = EchoBackend()
    backend.add_request(request("a", [1, 2, 3], max_tokens=3, stop_token_ids=[3]))
    assert run_to_end(backend) == {"a": ([1, 2, 3], "stop")}


def test_at_most_max_running_requests_run_the_rest_wait() -> None:
    backend = EchoBackend(max_running_requests=2)
    assert backend.free_slots() == 2
    for name in "abc":
        backend.add_request(request(name, [1], max_tokens=2))
    assert backend.free_slots() == 0
    assert [o.request_id for o in backend.step()] == ["a", "b"]
    load = backend.load()
    assert (load.running, load.waiting, load.kv_usage) == (2, 1, 1.0)
    assert [(o.request_id, o.finish_reason) for o in backend.step()] == [("a", "length"), ("b", "length")]
    # "c" starts in the step after "a" and "b" leave.
    assert backend.step() == [RequestOutput("c", [1])]
    assert backend.free_slots() == 1


def test_abort_takes_effect_in_the_next_step() -> None:
    backend = EchoBackend(max_running_requests=1)
    backend.add_request(request("running", [1, 2], max_tokens=10))
    backend.add_request(request("waiting", [3], max_tokens=10))
    assert backend.step() == [RequestOutput("running", [1])]
    backend.abort(["running", "waiting", "unknown"])
    assert backend.step() == [RequestOutput("running", [], "abort"), RequestOutput("waiting", [], "abort")]
    assert not backend.has_unfinished()
    assert backend.free_slots() == 1


def test_empty_prompt_is_refused_not_crashed() -> None:
    backend = EchoBackend()
    backend.add_request(request("empty", [], max_tokens=3))
    [output] = backend.step()
    assert (output.request_id, output.new_token_ids, output.finish_reason) == ("empty", [], "error")
    assert output.error


def test_a_structured_output_request_is_refused_not_served_unconstrained() -> None:
    backend = EchoBackend()
    backend.add_request(request("json", [5, 6], max_tokens=3, structured=StructuredOutputs(json_object=True)))
    [output] = backend.step()
    assert (output.new_token_ids, output.finish_reason) == ([], "error")
    assert output.error is not None and "torch backend" in output.error


def test_duplicate_request_id_is_ignored() -> None:
    backend = EchoBackend()
    backend.add_request(request("a", [1, 2, 3], max_tokens=3))
    assert backend.step() == [RequestOutput("a", [1])]
    # A redelivery of a running request: the running copy answers, once.
    backend.add_request(request("a", [7, 8, 9], max_tokens=3))
    assert run_to_end(backend) == {"a": ([2, 3], "length")}


def test_an_aborted_request_id_can_be_added_anew() -> None:
    """Let go of (another engine took it over), then claimed back later: it runs again."""
    backend = EchoBackend()
    backend.add_request(request("a", [1, 2, 3], max_tokens=3))
    backend.step()
    backend.abort(["a"])
    assert backend.step() == [RequestOutput("a", [], "abort")]
    backend.add_request(EngineRequest("a", [1, 2, 3], SamplingParams(max_tokens=3), output_token_ids=[1]))
    assert run_to_end(backend) == {"a": ([2, 3], "length")}


def test_logprobs_when_asked() -> None:
    backend = EchoBackend()
    backend.add_request(request("a", [4], max_tokens=1, logprobs=2))
    backend.add_request(request("b", [4], max_tokens=1, logprobs=0))
    a, b = backend.step()
    assert a.logprobs == [(0.0, [(4, 0.0)])]
    assert b.logprobs == [(0.0, [])]


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_step_delay_stands_in_for_the_forward_pass() -> None:
    fake = FakeTime()
    backend = EchoBackend(step_delay_s=0.01, sleep=fake.sleep, clock=fake.clock)
    backend.step()  # nothing running: no forward pass, no sleep
    assert fake.sleeps == []
    backend.add_request(request("a", [1], max_tokens=10))
    backend.load()  # start a window
    for _ in range(4):
        backend.step()
        fake.now += 0.01  # as much time again outside the forward pass
    assert fake.sleeps == [0.01] * 4
    assert backend.load().forward_share == pytest.approx(0.5)


def test_queue_time_is_from_add_to_first_step_once_per_request() -> None:
    fake = FakeTime()
    backend = EchoBackend(max_running_requests=1, sleep=fake.sleep, clock=fake.clock)
    backend.add_request(request("a", [1], max_tokens=2))
    backend.add_request(request("b", [1], max_tokens=1))
    fake.now += 0.25
    backend.step()  # "a" starts after 0.25 s
    fake.now += 0.5
    backend.step()  # "a" ends
    backend.step()  # "b" starts after 0.75 s
    waited = backend.load().queue_time
    assert waited.count == 2 and waited.total == pytest.approx(1.0)
    assert backend.load().preemptions == backend.load().prefix_cache_queries == 0  # no KV cache to speak of


def test_factory_builds_echo_from_settings() -> None:
    backend = create_backend(EngineSettings(engine_backend="echo", max_running_requests=3, echo_step_delay_ms=0))
    assert isinstance(backend, EchoBackend)
    assert backend.free_slots() == 3


def test_factory_names_a_backend_it_cannot_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "services.engine.hf_backend", None)  # import fails
    with pytest.raises(BackendUnavailable, match="'hf'"):
        create_backend(EngineSettings(engine_backend="hf"))


def test_prompt_logprobs_with_the_first_token_and_prefill_only_requests() -> None:
    backend = EchoBackend()
    backend.add_request(request("a", [5, 6, 7], max_tokens=2, prompt_logprobs=1))
    backend.add_request(request("score", [5, 6], max_tokens=0, prompt_logprobs=0))
    backend.add_request(request("echo", [5, 6], max_tokens=0))
    backend.add_request(EngineRequest("resumed", [5, 6], SamplingParams(max_tokens=3, prompt_logprobs=1), [5]))
    first = {output.request_id: output for output in backend.step()}
    # max_tokens 0: ended without a token, the prompt's logprobs (certain, as every echoed token) with it.
    assert first["score"] == RequestOutput("score", [], "length", prompt_logprobs=[None, (0.0, 1, [])])
    assert first["echo"] == RequestOutput("echo", [], "length")
    assert first["a"].prompt_logprobs == [None, (0.0, 1, [(6, 0.0)]), (0.0, 1, [(7, 0.0)])]
    assert first["resumed"].prompt_logprobs is None  # its first engine sent them
    assert all(output.prompt_logprobs is None for output in backend.step())
