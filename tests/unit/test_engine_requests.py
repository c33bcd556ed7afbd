"""EngineRequests (what runs, what stops, what is published: the main thread's decisions) and PullBudget."""

from __future__ import annotations

from services.engine.contract import EngineRequest, RequestOutput
from services.engine.handoff import PullBudget, Pulled
from services.engine.requests import EngineRequests
from services.engine.step_outputs import Publication
from shared.messages import (
    AbortRequests,
    DetokenizeParams,
    EngineStepOutput,
    Message,
    RequestFailed,
    SamplingParams,
    TokenizedRequest,
)
from shared.transport import Delivery, StreamNames

NAMES = StreamNames("t")
NOW = 1_000.0


def tokenized(request_id: str, gateway: str = "gw", deadline: float = NOW + 60) -> TokenizedRequest:
    return TokenizedRequest(
        request_id=request_id,
        gateway_id=gateway,
        deadline=deadline,
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=5),
        detokenize=DetokenizeParams(),
    )


def pulled(*entries: tuple[str, Message], done: dict[str, list[int]] | None = None) -> Pulled:
    deliveries = [Delivery(NAMES.tokenized, entry_id, message) for entry_id, message in entries]
    return Pulled(deliveries, done or {})


def requests() -> EngineRequests:
    return EngineRequests(NAMES, "engine-1", 1, clock=lambda: NOW)


def acked(publication: Publication) -> list[str]:
    return [ack.entry_id for ack in publication.acks]


def failures(publication: Publication) -> dict[str, int]:
    return {m.request_id: m.status for _, m in publication.messages if isinstance(m, RequestFailed)}


def test_a_pulled_request_runs_and_a_claimed_one_continues_after_its_published_output() -> None:
    book = requests()
    admission = book.admit(pulled(("1-0", tokenized("new")), ("2-0", tokenized("claimed")), done={"claimed": [7, 8]}))
    assert admission.requests == [
        EngineRequest("new", [1, 2, 3], SamplingParams(max_tokens=5)),
        EngineRequest("claimed", [1, 2, 3], SamplingParams(max_tokens=5), output_token_ids=[7, 8]),
    ]
    assert acked(admission.dropped) == []
    [(_, step)] = book.route([RequestOutput("claimed", [9])]).messages
    assert isinstance(step, EngineStepOutput) and step.deltas[0].offset == 2


def test_what_nobody_waits_for_is_acknowledged_unrun() -> None:
    book = requests()
    book.gateways_gone(frozenset({"gw-gone"}))
    book.aborts_read(["aborted"])
    admission = book.admit(
        pulled(
            ("1-0", tokenized("late", deadline=NOW - 1)),
            ("2-0", tokenized("aborted")),
            ("3-0", tokenized("orphan", gateway="gw-gone")),
            ("4-0", AbortRequests(request_ids=["x"])),  # not a request at all
        )
    )
    assert admission.requests == []
    assert acked(admission.dropped) == ["1-0", "2-0", "3-0", "4-0"]


def test_a_second_copy_of_a_running_request_never_runs_twice() -> None:
    book = requests()
    book.admit(pulled(("1-0", tokenized("r"))))
    # A duplicate publish (another entry) is acknowledged; our own entry claimed back stays ours, pending.
    admission = book.admit(pulled(("2-0", tokenized("r")), ("1-0", tokenized("r"))))
    assert admission.requests == [] and acked(admission.dropped) == ["2-0"]
    # The running copy answers for both: its end acknowledges its own entry.
    assert acked(book.route([RequestOutput("r", [4], "length")])) == ["1-0"]


def test_while_draining_pulled_entries_are_left_pending_for_another_engine() -> None:
    book = requests()
    book.stop_admitting()
    admission = book.admit(pulled(("1-0", tokenized("r"))))
    assert admission.requests == [] and acked(admission.dropped) == []
    assert "r" not in book


def test_aborts_stop_the_requests_running_here_and_keep_later_copies_from_running() -> None:
    book = requests()
    book.admit(pulled(("1-0", tokenized("mine"))))
    assert book.aborts_read(["mine", "elsewhere"]) == ["mine"]
    # The backend reports the abort: the request ends, acknowledged, with nothing for the client.
    publication = book.route([RequestOutput("mine", [], "abort")])
    assert acked(publication) == ["1-0"] and publication.messages == []
    assert book.admit(pulled(("2-0", tokenized("elsewhere")))).requests == []


def test_requests_of_a_gateway_that_is_gone_are_stopped_once() -> None:
    book = requests()
    book.admit(pulled(("1-0", tokenized("doomed", gateway="gw-a")), ("2-0", tokenized("kept", gateway="gw-b"))))
    assert book.gateways_gone(frozenset({"gw-a"})) == ["doomed"]
    assert book.gateways_gone(frozenset({"gw-a"})) == []  # still gone: nothing new
    # A gateway that beats again is served again.
    book.gateways_gone(frozenset())
    assert [r.request_id for r in book.admit(pulled(("3-0", tokenized("back", gateway="gw-a")))).requests] == ["back"]


def test_a_request_another_engine_took_is_dropped_unpublished_and_can_come_back() -> None:
    book = requests()
    book.admit(pulled(("1-0", tokenized("taken")), ("2-0", tokenized("kept"))))
    assert book.entries_lost(["1-0"]) == ["taken"]
    assert book.entries_lost(["1-0"]) == []  # reported again by a later publish: already let go
    # Its outputs still in flight are dropped; its abort publishes nothing and acknowledges nothing.
    assert book.route([RequestOutput("taken", [5]), RequestOutput("taken", [], "abort")]).empty
    # The engine that took it died too: claimed back, it runs again from its checkpoint.
    admission = book.admit(pulled(("1-0", tokenized("taken")), done={"taken": [5]}))
    assert [r.output_token_ids for r in admission.requests] == [[5]]


def test_owned_entries_are_reported_only_when_they_change() -> None:
    book = requests()
    assert book.owned_entries() == []
    assert book.owned_entries() is None
    book.admit(pulled(("1-0", tokenized("a")), ("2-0", tokenized("b"))))
    assert book.owned_entries() == ["1-0", "2-0"]
    book.route([RequestOutput("a", [4])])
    assert book.owned_entries() is None
    book.route([RequestOutput("a", [4], "stop")])
    assert book.owned_entries() == ["2-0"]


def test_a_crash_fails_every_request_with_a_500() -> None:
    book = requests()
    book.admit(pulled(("1-0", tokenized("a")), ("2-0", tokenized("b"))))
    publication = book.fail_all("RuntimeError: device lost")
    assert failures(publication) == {"a": 500, "b": 500}
    assert sorted(acked(publication)) == ["1-0", "2-0"]
    assert len(book) == 0


def test_after_a_drain_started_requests_fail_with_503_and_the_rest_stay_for_another_engine() -> None:
    book = requests()
    book.admit(pulled(("1-0", tokenized("started")), ("2-0", tokenized("waiting"))))
    book.route([RequestOutput("started", [4])])
    publication = book.release_all()
    assert failures(publication) == {"started": 503}
    assert acked(publication) == ["1-0"]
    assert len(book) == 0


def test_pull_budget_counts_entries_on_their_way_until_the_main_thread_takes_them() -> None:
    budget = PullBudget()
    assert budget.room() == 0
    assert budget.update(free_slots=4, taken=0)
    budget.count_read(3)
    assert budget.room() == 1
    # The main thread took the three and added them to the backend: both figures move at once.
    assert not budget.update(free_slots=1, taken=3)
    assert budget.room() == 1
    budget.close()
    assert budget.room() == 0
