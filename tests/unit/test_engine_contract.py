"""What every engine backend decides the same way: refusals, stop tokens, the forward share."""

from __future__ import annotations

import pytest

from services.engine.contract import EngineRequest, ForwardTime, refusal, stop_token_ids, wants_prompt_logprobs
from shared.messages import SamplingParams


def request(prompt: list[int], output: list[int] | None = None) -> EngineRequest:
    return EngineRequest("r", prompt, SamplingParams(), output_token_ids=output or [])


@pytest.mark.parametrize(
    ("prompt", "output", "words"),
    [
        ([], [], "the prompt is empty: at least one token is needed"),
        (list(range(11)), [], "the prompt has 11 tokens, more than this model's context length of 10 tokens"),
        ([1, 50], [], "prompt token id 50 is outside this model's vocabulary (0..49)"),
        ([-1], [], "prompt token id -1 is outside this model's vocabulary (0..49)"),
        ([1], [2, 77], "output token id 77 is outside this model's vocabulary (0..49)"),
    ],
)
def test_a_request_that_can_never_run_is_refused_in_words_the_client_can_act_on(
    prompt: list[int], output: list[int], words: str
) -> None:
    assert refusal(request(prompt, output), max_model_len=10, vocab_size=50) == words


def test_limits_a_backend_does_not_have_are_not_checked() -> None:
    assert refusal(request(list(range(1000)))) is None
    assert refusal(request([])) == "the prompt is empty: at least one token is needed"
    assert refusal(request(list(range(10))), max_model_len=10, vocab_size=10) is None


def test_stop_tokens_are_the_requests_stop_ids_and_eos_unless_ignored() -> None:
    assert stop_token_ids(SamplingParams(stop_token_ids=[7], eos_token_ids=[2]), [0]) == {7, 2}
    # A request that names no EOS gets the model's.
    assert stop_token_ids(SamplingParams(stop_token_ids=[7]), [0, 1]) == {7, 0, 1}
    assert stop_token_ids(SamplingParams(stop_token_ids=[7], eos_token_ids=[2], ignore_eos=True), [0]) == {7}
    assert stop_token_ids(SamplingParams()) == frozenset()


def test_forward_share_is_forward_time_over_the_recent_window() -> None:
    now = [100.0]
    forward = ForwardTime(lambda: now[0], window_s=10.0)
    assert forward.share() == 0.0
    for _ in range(4):
        with forward.measure():
            now[0] += 0.3
        now[0] += 0.1  # time outside the forward pass
    assert forward.share() == pytest.approx(0.75)
    now[0] += 30.0  # idle: the window holds no forward time any more
    assert forward.share() == 0.0


def test_a_forward_pass_that_raises_is_not_counted() -> None:
    now = [0.0]
    forward = ForwardTime(lambda: now[0])
    with pytest.raises(RuntimeError), forward.measure():
        now[0] += 1.0
        raise RuntimeError("device lost")
    assert forward.share() == 0.0


def test_prompt_logprobs_are_computed_when_asked_unless_taken_over() -> None:
    asked = SamplingParams(prompt_logprobs=0)
    assert wants_prompt_logprobs(EngineRequest("r", [1, 2], asked))
    assert not wants_prompt_logprobs(EngineRequest("r", [1, 2], SamplingParams()))
    # The engine that published the request's first output sent them with it.
    assert not wants_prompt_logprobs(EngineRequest("r", [1, 2], asked, output_token_ids=[3]))
