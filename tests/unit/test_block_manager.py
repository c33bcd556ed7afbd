"""BlockManager: allocation, ref counts, prefix-cache hits and LRU eviction."""

from __future__ import annotations

import pytest

from services.engine.core.block_manager import BlockManager, chain_hash
from services.engine.core.sequence import Sequence
from shared.messages import SamplingParams

BLOCK = 4


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, tokens, SamplingParams(), arrival=0)


def admit(bm: BlockManager, s: Sequence) -> int:
    """Allocate the whole uncomputed part, as if computed in one step; returns cache hits (tokens)."""
    cached = bm.match_prefix(s)
    need = s.num_tokens - len(cached) * bm.block_size
    bm.allocate(s, need, cached)
    hits = s.num_computed_tokens
    s.num_computed_tokens += need
    bm.cache_computed_blocks(s)
    return hits


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    a, b = seq(list(range(9)), "a"), seq(list(range(100, 103)), "b")
    admit(bm, a)
    admit(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 6 and bm.usage() == pytest.approx(0.4)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.usage() == 0.0
    assert a.block_table == [] and a.num_computed_tokens == 0


def test_prefix_hit_shares_full_blocks_and_counts_references() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    a = seq(list(range(10)), "a")
    admit(bm, a)
    b = seq(list(range(8)) + [50, 51, 52], "b")
    assert admit(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_counts[i] for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    assert [bm.ref_counts[i] for i in b.block_table[:2]] == [1, 1]
    assert bm.num_free_blocks == 10 - 3
    bm.free(b)
    assert bm.num_free_blocks == 10 and all(c == 0 for c in bm.ref_counts)


def test_cached_blocks_survive_free_and_serve_a_later_request() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    a = seq(list(range(12)), "a")
    admit(bm, a)
    first_two = a.block_table[:2]
    bm.free(a)
    assert bm.num_cached_free_blocks == 3 and bm.num_free_blocks == 10
    b = seq(list(range(12)), "b")
    # 12 tokens = 3 full blocks, but the last block must be computed: 2 blocks hit.
    assert admit(bm, b) == 8 and b.block_table[:2] == first_two
    assert bm.num_cached_free_blocks == 1


def test_last_token_block_is_never_served_from_cache() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    admit(bm, seq(list(range(8)), "a"))
    b = seq(list(range(8)), "b")
    assert len(bm.match_prefix(b)) == 1
    c = seq(list(range(9)), "c")
    assert len(bm.match_prefix(c)) == 2


def test_same_block_tokens_after_a_different_prefix_do_not_hit() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    admit(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "a"))
    assert bm.match_prefix(seq([9, 9, 9, 9, 5, 6, 7, 8, 0], "b")) == []
    assert chain_hash(b"", [5, 6, 7, 8]) != chain_hash(chain_hash(b"", [1, 2, 3, 4]), [5, 6, 7, 8])
    hit = bm.match_prefix(seq([1, 2, 3, 4, 9, 9, 9, 9, 0], "c"))
    assert len(hit) == 1


def test_eviction_takes_never_cached_blocks_first_then_least_recently_freed() -> None:
    bm = BlockManager(num_blocks=6, block_size=BLOCK)
    old, new = seq(list(range(8)) + [0], "old"), seq(list(range(50, 58)) + [0], "new")
    admit(bm, old)
    admit(bm, new)
    bm.free(old)  # freed first: evicted first
    bm.free(new)
    assert bm.num_cached_free_blocks == 4 and bm.num_free_blocks == 6
    # Needs 3 blocks: the 2 never-cached ones, then one evicted from "old" (its tail first).
    filler = seq(list(range(200, 211)), "filler")
    admit(bm, filler)
    assert len(bm.match_prefix(seq(list(range(8)) + [0], "x"))) == 1
    assert len(bm.match_prefix(seq(list(range(50, 58)) + [0], "y"))) == 2
    # Two more blocks: the rest of "old" goes, then the tail of "new".
    admit(bm, seq(list(range(300, 306)), "more"))
    assert bm.match_prefix(seq(list(range(8)) + [0], "x")) == []
    assert len(bm.match_prefix(seq(list(range(50, 58)) + [0], "y"))) == 1


def test_a_hit_on_an_evictable_block_counts_against_free_space() -> None:
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    a = seq(list(range(9)), "a")
    admit(bm, a)
    bm.free(a)
    b = seq(list(range(9)), "b")
    cached = bm.match_prefix(b)
    assert len(cached) == 2
    # 2 cached blocks + 1 new block = all 3 blocks.
    assert bm.blocks_needed(b, 1, cached) == 3
    assert bm.can_allocate(b, 1, cached) and not bm.can_allocate(b, 1, cached, reserve=1)
    assert not bm.can_allocate(b, 5, cached)
    bm.allocate(b, 1, cached)
    assert bm.num_free_blocks == 0
    with pytest.raises(RuntimeError, match="not enough free KV blocks"):
        bm.allocate(seq([1], "c"), 1, [])


def test_decode_appends_a_block_only_when_the_last_one_is_full() -> None:
    bm = BlockManager(num_blocks=2, block_size=BLOCK)
    s = seq([1, 2, 3], "s")
    admit(bm, s)
    for token in (4, 5, 6, 7, 8):
        s.append_token(token)
        assert bm.can_append(s, 1)
        bm.may_append(s, 1)
        s.num_computed_tokens += 1
        bm.cache_computed_blocks(s)
    assert len(s.block_table) == 2 and s.num_computed_tokens == 8
    s.append_token(9)
    assert not bm.can_append(s, 1)
    with pytest.raises(RuntimeError):
        bm.may_append(s, 1)
    # Both blocks became full during decode, so they are cached too.
    bm.free(s)
    assert bm.num_cached_free_blocks == 2


def test_duplicate_content_is_cached_once_and_both_copies_are_freed() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a, b = seq(list(range(9)), "a"), seq(list(range(9)), "b")
    # Both admitted before either is computed (same step): no sharing possible yet.
    bm.allocate(a, 9, bm.match_prefix(a))
    bm.allocate(b, 9, bm.match_prefix(b))
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.cache_computed_blocks(s)
    b_blocks = list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_cached_free_blocks == 2
    # The first copy registered is the cached one; the second went back as plain free.
    hit = bm.match_prefix(seq(list(range(9)), "c"))
    assert len(hit) == 2 and hit[0] not in b_blocks


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    a = seq(list(range(9)), "a")
    admit(bm, a)
    bm.free(a)
    assert bm.match_prefix(seq(list(range(9)), "b")) == []
    assert bm.num_cached_free_blocks == 0


def test_reset_prefix_cache_forgets_unused_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a = seq(list(range(9)), "a")
    admit(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_free_blocks == 0 and bm.num_free_blocks == 8
    assert bm.match_prefix(seq(list(range(9)), "b")) == []


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)
