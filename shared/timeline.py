"""A request's stage timeline (issue 12): when it passed each hop of the pipeline. Pure logic.

Each stage stamps the hops it sees (unix time, seconds) into the ``timeline`` of the message it
passes on: the gateway into the completion request, the tokenizer into the tokenized request,
the engine into a request's first and last token deltas, the detokenizer into its last text
delta. The gateway merges them, adds its own, and turns them into ``SEGMENTS``: consecutive
spans that add up to the request's whole time in the gateway (a queue segment is the time
between one stage publishing and the next reading, Redis round trips included). Times come from
each process's wall clock, so on several hosts they are only as good as the hosts' clock sync
(a segment across hosts can even come out negative; metrics count it as 0).
"""

from __future__ import annotations

from collections.abc import Mapping

Timeline = dict[str, float]

GATEWAY_RECEIVED = "gateway_received"  # the HTTP request arrived
GATEWAY_PUBLISHED = "gateway_published"  # written to the requests stream
TOKENIZER_READ = "tokenizer_read"
TOKENIZER_DONE = "tokenizer_done"  # encoded, about to be published
ENGINE_PULLED = "engine_pulled"  # read from the tokenized stream
ENGINE_SCHEDULED = "engine_scheduled"  # in a batch for the first time: its prefill starts
ENGINE_FIRST_TOKEN = "engine_first_token"  # its first output token published
ENGINE_FINISHED = "engine_finished"  # its last output token published
DETOKENIZER_READ = "detokenizer_read"  # the last token delta read
DETOKENIZER_SENT = "detokenizer_sent"  # the last text delta built, about to be published
GATEWAY_FIRST_OUTPUT = "gateway_first_output"  # the first text delta read
GATEWAY_LAST_OUTPUT = "gateway_last_output"  # the last text delta read
GATEWAY_SENT = "gateway_sent"  # the response's last bytes handed to the server

# (segment, from hop, to hop), in the order a request goes through them: together, received to sent.
SEGMENTS: tuple[tuple[str, str, str], ...] = (
    ("gateway_in", GATEWAY_RECEIVED, GATEWAY_PUBLISHED),
    ("requests_queue", GATEWAY_PUBLISHED, TOKENIZER_READ),
    ("tokenizer", TOKENIZER_READ, TOKENIZER_DONE),
    ("tokenized_queue", TOKENIZER_DONE, ENGINE_PULLED),
    ("engine_wait", ENGINE_PULLED, ENGINE_SCHEDULED),
    ("prefill", ENGINE_SCHEDULED, ENGINE_FIRST_TOKEN),
    ("decode", ENGINE_FIRST_TOKEN, ENGINE_FINISHED),
    ("generated_queue", ENGINE_FINISHED, DETOKENIZER_READ),
    ("detokenizer", DETOKENIZER_READ, DETOKENIZER_SENT),
    ("responses_queue", DETOKENIZER_SENT, GATEWAY_LAST_OUTPUT),
    ("gateway_out", GATEWAY_LAST_OUTPUT, GATEWAY_SENT),
)
# The first token's way back, beside the chain: engine to gateway (its queues and the detokenizer).
FIRST_OUTPUT_RETURN = ("first_output_return", ENGINE_FIRST_TOKEN, GATEWAY_FIRST_OUTPUT)
SEGMENT_NAMES = tuple(name for name, _, _ in (*SEGMENTS, FIRST_OUTPUT_RETURN))


def merge(into: Timeline, stamps: Mapping[str, float] | None) -> None:
    """Add ``stamps`` the timeline lacks: the first time a hop is passed counts (a request taken
    over by another engine passes some hops twice)."""
    for hop, at in (stamps or {}).items():
        into.setdefault(hop, at)


def segments(timeline: Mapping[str, float]) -> dict[str, float]:
    """The span of each segment whose two hops the timeline has, in seconds, in SEGMENTS order."""
    spans = {}
    for name, start, end in (*SEGMENTS, FIRST_OUTPUT_RETURN):
        if start in timeline and end in timeline:
            spans[name] = timeline[end] - timeline[start]
    return spans
