"""The stage timeline (issue 12): segments from hops, and what each stage stamps. Pure logic."""

from __future__ import annotations

from itertools import count

import pytest

from services.engine.contract import RequestOutput
from services.engine.step_outputs import OutputRouter
from shared.messages import DetokenizeParams, EngineStepOutput, SamplingParams, TokenDelta, TokenizedRequest
from shared.timeline import SEGMENTS, merge, segments
from shared.transport import StreamNames


def test_segments_add_up_to_the_whole_and_skip_what_is_missing() -> None:
    hops = [SEGMENTS[0][1], *(end for _, _, end in SEGMENTS)]
    timeline = {hop: 100.0 + i * i for i, hop in enumerate(hops)}
    spans = segments(timeline)
    assert sum(spans[name] for name, _, _ in SEGMENTS) == timeline[hops[-1]] - timeline[hops[0]]
    del timeline["engine_scheduled"]  # a backend that does not say when a request first ran
    assert "engine_wait" not in segments(timeline) and "prefill" not in segments(timeline)


def test_the_first_pass_of_a_hop_counts() -> None:
    timeline = {"engine_pulled": 1.0}
    merge(timeline, {"engine_pulled": 5.0, "engine_first_token": 6.0})  # a second engine took it over
    assert timeline == {"engine_pulled": 1.0, "engine_first_token": 6.0}
    merge(timeline, None)
    assert timeline == {"engine_pulled": 1.0, "engine_first_token": 6.0}


def deltas(publication_messages: list[tuple[str, object]]) -> list[TokenDelta]:
    return [d for _, m in publication_messages if isinstance(m, EngineStepOutput) for d in m.deltas]


@pytest.mark.parametrize("single_output", [False, True])
def test_the_engine_stamps_its_hops_on_the_first_and_last_deltas(single_output: bool) -> None:
    ticks = count(10)
    router = OutputRouter(StreamNames("t"), "e", 1, clock=lambda: float(next(ticks)))
    request = TokenizedRequest(
        request_id="r",
        gateway_id="gw",
        deadline=1e12,
        prompt_token_ids=[1, 2],
        sampling=SamplingParams(),
        detokenize=DetokenizeParams(),
        timeline={"gateway_received": 1.0, "tokenizer_done": 2.0},
    )
    router.track(request, "1-0", pulled_at=3.0)
    if single_output:
        (only,) = deltas(router.route([RequestOutput("r", [5], "length", scheduled_at=4.0)]).messages)
        assert only.timeline == {
            "gateway_received": 1.0,
            "tokenizer_done": 2.0,
            "engine_pulled": 3.0,
            "engine_scheduled": 4.0,
            "engine_first_token": 10.0,
            "engine_finished": 11.0,
        }
        return
    (first,) = deltas(router.route([RequestOutput("r", [5], scheduled_at=4.0)]).messages)
    (middle,) = deltas(router.route([RequestOutput("r", [6])]).messages)
    (last,) = deltas(router.route([RequestOutput("r", [7], "stop")]).messages)
    assert first.timeline is not None and first.timeline["engine_scheduled"] == 4.0
    assert first.timeline["engine_first_token"] == 10.0 and "engine_finished" not in first.timeline
    assert middle.timeline is None  # the deltas between carry nothing
    assert last.timeline == {"engine_finished": 11.0}
