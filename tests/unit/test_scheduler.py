"""Scheduler policy: token budget, decode priority, chunking, preemption order, refusals."""

from __future__ import annotations

from services.engine.core.block_manager import BlockManager
from services.engine.core.scheduler import ScheduledBatch, Scheduler
from services.engine.core.sequence import Sequence, SequenceStatus
from shared.messages import SamplingParams

_arrivals = iter(range(1, 1_000_000))


def make(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 16,
    max_running: int = 8,
    max_len: int = 4096,
    watermark: int = 0,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(
        bm,
        max_num_batched_tokens=budget,
        max_running_requests=max_running,
        max_model_len=max_len,
        watermark_blocks=watermark,
    )


def new_seq(sched: Scheduler, name: str, prompt_len: int, max_tokens: int = 1000) -> Sequence:
    arrival = next(_arrivals)
    # Distinct prompts, so the prefix cache stays out of these tests.
    prompt = [(7 * i + 13 * arrival) % 50 for i in range(prompt_len)]
    s = Sequence(name, prompt, SamplingParams(max_tokens=max_tokens), arrival=arrival)
    sched.add(s)
    return s


def complete(sched: Scheduler, batch: ScheduledBatch) -> None:
    """What the engine does after forward: advance, cache, append a token, finish at max_tokens."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        sched.block_manager.cache_computed_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.append_token(1)
            if s.num_output_tokens >= s.sampling.max_tokens:
                sched.finish(s)
                s.finish("length")


def step(sched: Scheduler) -> ScheduledBatch:
    batch = sched.schedule()
    complete(sched, batch)
    return batch


def test_token_budget_is_never_exceeded_and_everything_finishes() -> None:
    sched = make(budget=16, max_running=8)
    seqs = [new_seq(sched, f"s{i}", 5 + 7 * i, max_tokens=5) for i in range(10)]
    for _ in range(500):
        if not sched.has_unfinished():
            break
        batch = step(sched)
        assert 0 < batch.num_tokens <= 16
        assert len(sched.running) <= 8
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_long_prompt_is_chunked_and_running_decodes_go_every_step() -> None:
    sched = make(num_blocks=512, budget=16, max_running=8)
    decoders = [new_seq(sched, f"d{i}", 3) for i in range(4)]
    step(sched)  # their prompts, 12 tokens
    assert all(s.num_output_tokens == 1 for s in decoders)
    long = new_seq(sched, "long", 300)
    chunks = []
    while long.num_output_tokens == 0:
        before = [s.num_output_tokens for s in decoders]
        batch = step(sched)
        # Every decode advanced in this very step, the long prompt got the rest.
        assert [s.num_output_tokens for s in decoders] == [b + 1 for b in before]
        assert batch.seqs[:4] == decoders
        chunks.append(batch.num_new_tokens[-1])
    assert sum(chunks) == 300 and max(chunks) == 12 and len(chunks) == 25


def test_running_cap_limits_admission() -> None:
    sched = make(budget=64, max_running=3)
    for i in range(6):
        new_seq(sched, f"s{i}", 4)
    batch = step(sched)
    assert len(batch.seqs) == 3 and len(sched.running) == 3 and len(sched.waiting) == 3


def test_running_cap_never_exceeds_the_token_budget() -> None:
    # More running sequences than tokens per step would leave decodes unserved.
    assert make(budget=4, max_running=64).max_running == 4


def test_waiting_queue_is_first_come_first_served() -> None:
    sched = make(num_blocks=10, block_size=4, budget=64, max_running=8)
    new_seq(sched, "holder", 20)  # 5 of 10 blocks
    step(sched)
    big = new_seq(sched, "big", 24)  # needs 6: does not fit yet
    small = new_seq(sched, "small", 4)  # would fit, but waits its turn
    batch = step(sched)
    assert big not in batch.seqs and small not in batch.seqs
    assert sched.waiting == [big, small]


def test_newest_is_preempted_first_and_the_oldest_never() -> None:
    # 12 blocks of 4 tokens; three 15-token prompts fill all of them.
    sched = make(num_blocks=12, block_size=4, budget=64, max_running=8)
    a, b, c = (new_seq(sched, name, 15, max_tokens=30) for name in "abc")
    step(sched)
    assert sched.running == [a, b, c] and sched.block_manager.num_free_blocks == 0
    step(sched)  # position 15 still fits in each 4th block
    batch = step(sched)  # position 16 needs a 5th block: c, the newest, makes room
    assert batch.preempted == [c] and c.status is SequenceStatus.WAITING and c.block_table == []
    assert sched.running == [a, b] and batch.seqs == [a, b]
    victims = []
    for _ in range(500):
        if not sched.has_unfinished():
            break
        batch = step(sched)
        for victim in batch.preempted:
            victims.append(victim.request_id)
            # Whoever still runs is older than the victim.
            assert all(s.arrival < victim.arrival for s in sched.running)
    assert a.num_preemptions == 0 and "b" in victims
    assert all(s.num_output_tokens == 30 for s in (a, b, c))
    assert sched.block_manager.num_free_blocks == 12


def test_preempted_sequences_wait_in_arrival_order_ahead_of_newer_ones() -> None:
    sched = make(num_blocks=12, block_size=4, budget=64, max_running=8)
    _, b, c = (new_seq(sched, name, 15) for name in "abc")
    for _ in range(3):
        step(sched)
    d = new_seq(sched, "d", 3)
    sched._preempt(b)
    assert sched.waiting == [b, c, d]


def test_preempting_an_already_scheduled_decode_gives_its_budget_back() -> None:
    # 6 blocks of 4. "old" is part way through its 20-token prompt (8 computed, 2 blocks),
    # "young" decodes with 4 blocks: the pool is full.
    sched = make(num_blocks=6, block_size=4, budget=16, max_running=4)
    bm = sched.block_manager
    old = new_seq(sched, "old", 20)
    young = new_seq(sched, "young", 13)
    for s, computed in ((old, 8), (young, 13)):
        sched.waiting.remove(s)
        bm.allocate(s, computed, [])
        s.num_computed_tokens = computed
        s.status = SequenceStatus.RUNNING
        sched.running.append(s)
    young.append_token(1)
    assert bm.num_free_blocks == 0
    batch = sched.schedule()
    # young's decode was scheduled first, then withdrawn when old needed its blocks.
    assert batch.preempted == [young] and young.status is SequenceStatus.WAITING
    assert batch.seqs == [old] and batch.num_new_tokens == [12]


def test_prompt_chunk_shrinks_to_the_free_room_instead_of_preempting() -> None:
    sched = make(num_blocks=8, block_size=4, budget=64, max_running=4)
    bm = sched.block_manager
    old = new_seq(sched, "old", 24)
    young = new_seq(sched, "young", 11)
    for s, computed in ((old, 8), (young, 11)):
        sched.waiting.remove(s)
        bm.allocate(s, computed, [])
        s.num_computed_tokens = computed
        s.status = SequenceStatus.RUNNING
        sched.running.append(s)
    young.append_token(1)
    assert bm.num_free_blocks == 3
    batch = sched.schedule()
    assert batch.preempted == [] and batch.seqs == [young, old] and batch.num_new_tokens == [1, 12]


def test_refusals_explain_what_can_never_fit_the_kv_cache() -> None:
    sched = make(num_blocks=8, block_size=4, max_len=100)
    assert sched.refusal(32) is None
    assert "KV cache holds at most 32 tokens" in (sched.refusal(33) or "")
    big = make(num_blocks=1000, block_size=4, max_len=100)
    assert big.max_model_len == 100 and sched.max_model_len == 32


def test_watermark_keeps_room_for_running_sequences() -> None:
    sched = make(num_blocks=10, block_size=4, budget=64, max_running=8, watermark=2)
    new_seq(sched, "a", 12)  # alone: admitted without the watermark, 3 blocks
    step(sched)
    b = new_seq(sched, "b", 12)
    step(sched)  # a grows to 4 blocks; b takes 3, leaving 3 >= 2 free
    assert b.status is SequenceStatus.RUNNING
    c = new_seq(sched, "c", 4)
    step(sched)  # b grows to 4 blocks: 2 free, and c's block would eat the reserve
    assert c.status is SequenceStatus.WAITING and sched.block_manager.num_free_blocks == 2


def same_prompt_seqs(sched: Scheduler, names: list[str], prompt: list[int]) -> list[Sequence]:
    seqs = []
    for name in names:
        s = Sequence(name, list(prompt), SamplingParams(max_tokens=3), arrival=next(_arrivals))
        sched.add(s)
        seqs.append(s)
    return seqs


def test_copies_of_one_prompt_arriving_together_compute_it_once() -> None:
    """n choices of one request: the first computes the prompt, the others wait one step and
    take its blocks from the prefix cache, computing only the block holding the last token."""
    sched = make(block_size=4, budget=64)
    prompt = [(5 * i) % 50 for i in range(22)]  # 5 full blocks and 2 tokens
    first, *others = same_prompt_seqs(sched, ["c0", "c1", "c2", "c3"], prompt)
    bystander = new_seq(sched, "other", 6)

    one = step(sched)
    assert one.seqs == [first, bystander]  # the copies wait; the request behind them does not
    assert one.num_new_tokens == [22, 6]
    two = step(sched)
    assert set(two.seqs) == {first, bystander, *others}
    for s in others:
        assert two.num_new_tokens[two.seqs.index(s)] == 2  # 20 of 22 tokens came from the cache
        assert s.num_cached_tokens == 20
    assert sched.block_manager.prefix_hits == 3 * 20


def test_copies_wait_through_a_chunked_prefill_and_then_share_all_of_it() -> None:
    sched = make(block_size=4, budget=8)
    prompt = [(3 * i) % 50 for i in range(30)]
    first, second = same_prompt_seqs(sched, ["c0", "c1"], prompt)
    computed_by_second = 0
    for _ in range(40):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        if second in batch.seqs and second.num_output_tokens == 0:
            computed_by_second += batch.num_new_tokens[batch.seqs.index(second)]
        complete(sched, batch)
    assert first.status is second.status is SequenceStatus.FINISHED
    assert computed_by_second == 30 - 28  # 7 full blocks shared; only the last block's 2 tokens


def test_without_prefix_caching_copies_do_not_wait() -> None:
    bm = BlockManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_batched_tokens=64, max_running_requests=8, max_model_len=4096, watermark_blocks=0)
    seqs = same_prompt_seqs(sched, ["c0", "c1"], [(5 * i) % 50 for i in range(10)])
    assert step(sched).seqs == seqs


def test_copies_under_preemption_all_finish_and_free_their_blocks() -> None:
    """A copy waits only for a running twin; a preempted twin goes back to waiting, and the
    copies never wait on each other forever, however the pool forces preemptions."""
    sched = make(num_blocks=14, block_size=4, budget=8, max_running=4)
    seqs = []
    for p in range(3):
        prompt = [(11 * i + 7 * p) % 50 for i in range(10 + 5 * p)]
        seqs += same_prompt_seqs(sched, [f"p{p}c{c}" for c in range(3)], prompt)
    for s in seqs:
        s.sampling = SamplingParams(max_tokens=12)
    for _ in range(400):
        if not sched.has_unfinished():
            break
        step(sched)
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert sched.num_preemptions > 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
