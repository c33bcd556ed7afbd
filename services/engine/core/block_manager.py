"""The paged KV cache's bookkeeping: blocks, free list, ref counts, prefix cache.

The KV pool itself (tensors) belongs to the model runner; this class only
decides which block ids each sequence uses. A block holds ``block_size``
consecutive tokens of one sequence.

Prefix caching: once a block is full and its K/V are computed, it is keyed by
a chain hash of its tokens and the hash of the block before it, so the key
names the whole prefix up to the block's end. A later sequence whose prompt
starts with the same tokens takes those blocks (ref count + 1) instead of
computing them. A block whose ref count drops to 0 keeps its content and key
and is "evictable": it counts as free, is reused on a cache hit, and is
overwritten least-recently-freed first when no never-cached block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from services.engine.core.sequence import Sequence

_NO_PARENT = b""


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Key of a full block: its tokens and the key of the block before it.

    A cryptographic digest, so that no crafted prompt can collide with another
    user's prefix and read their cached K/V.
    """
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Key of each block whose content is registered in the prefix cache.
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        # Free blocks holding nothing worth keeping: used before evictable ones.
        self._free: deque[int] = deque(range(num_blocks))
        # Free blocks still in the prefix cache, least recently freed first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Statistics: prompt tokens looked up / found in the prefix cache.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- capacity -------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (never-cached plus evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._evictable)

    def usage(self) -> float:
        """Share of blocks referenced by some sequence, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------

    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        hashes = seq.block_hashes
        size = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else _NO_PARENT
            hashes.append(chain_hash(parent, seq.token_ids[i * size : (i + 1) * size]))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that can serve the start of a sequence with no blocks yet.

        The block holding the last token is never taken from the cache even
        when full: that token must be computed to get the next-token logits;
        nor is one whose logits give a prompt logprob the sequence still needs
        (Sequence.num_cacheable_tokens).
        """
        if not self.enable_prefix_caching or seq.block_table:
            return []
        max_blocks = max(0, seq.num_cacheable_tokens) // self.block_size
        self._extend_hashes(seq, max_blocks)
        found: list[int] = []
        for key in seq.block_hashes[:max_blocks]:
            block_id = self._hash_to_block.get(key)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def next_block_key(self, seq: Sequence, num_cached_blocks: int) -> bytes | None:
        """Key of the block a match_prefix for ``seq`` would take next, if one more were cached;
        None when no further block of it may come from the cache."""
        if num_cached_blocks >= max(0, seq.num_cacheable_tokens) // self.block_size:
            return None
        self._extend_hashes(seq, num_cached_blocks + 1)
        return seq.block_hashes[num_cached_blocks]

    def uncomputed_full_block_keys(self, seq: Sequence) -> list[bytes]:
        """Keys of a running sequence's full blocks whose K/V are not computed yet (its prompt,
        mostly): once they are, cache_computed_blocks offers them to the prefix cache. Empty when
        prefix caching is off."""
        if not self.enable_prefix_caching:
            return []
        first = seq.num_computed_tokens // self.block_size
        end = seq.num_tokens // self.block_size
        if first >= end:
            return []
        self._extend_hashes(seq, end)
        return seq.block_hashes[first:end]

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly computed full blocks to the prefix cache.

        Called after the forward pass has written their K/V. If another
        sequence already registered the same content, that block stays the
        cached one and this copy is simply freed when its sequence ends.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_hashed_blocks:
            return
        self._extend_hashes(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            key = seq.block_hashes[i]
            block_id = seq.block_table[i]
            if self._block_hash[block_id] is None and key not in self._hash_to_block:
                self._block_hash[block_id] = key
                self._hash_to_block[key] = block_id
        seq.num_hashed_blocks = num_full

    # ---- allocation -------------------------------------------------------

    def _take_free_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        key = self._block_hash[block_id]
        if key is not None:
            del self._hash_to_block[key]
            self._block_hash[block_id] = None
        return block_id

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> int:
        """Free blocks that admitting/extending ``seq`` by num_new_tokens would use."""
        if cached is None:
            have, computed = len(seq.block_table), seq.num_computed_tokens
        else:
            have, computed = len(cached), len(cached) * self.block_size
        need = max(0, self.blocks_for(computed + num_new_tokens) - have)
        if cached:
            # Cached blocks nobody references are counted as free: taking them uses them up.
            need += sum(1 for block_id in cached if self.ref_counts[block_id] == 0)
        return need

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int], reserve: int = 0) -> bool:
        """Whether a sequence without blocks can start with its cached prefix
        plus num_new_tokens, leaving at least ``reserve`` blocks free."""
        return self.blocks_needed(seq, num_new_tokens, cached) + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> None:
        """Give a sequence without blocks its cached prefix plus room for
        num_new_tokens. Call can_allocate first."""
        if seq.block_table:
            raise ValueError(f"{seq.request_id}: allocate() on a sequence that already has blocks")
        if not self.can_allocate(seq, num_new_tokens, cached):
            raise RuntimeError(f"{seq.request_id}: not enough free KV blocks (check can_allocate first)")
        for block_id in cached:
            if self.ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self.ref_counts[block_id] += 1
        seq.block_table = list(cached)
        seq.num_hashed_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def num_fitting_tokens(self, seq: Sequence) -> int:
        """How many more tokens a running sequence could compute with the free blocks."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size - seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether a running sequence can compute num_new_tokens more tokens."""
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Add the blocks a running sequence needs for num_new_tokens more tokens."""
        if not self.can_append(seq, num_new_tokens):
            raise RuntimeError(f"{seq.request_id}: not enough free KV blocks (check can_append first)")
        self._grow(seq, seq.num_computed_tokens + num_new_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            block_id = self._take_free_block()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks; its computed tokens are forgotten.

        Blocks go back last first, so that when cached blocks must be evicted
        the tail of a prefix goes before its head (heads are shared more).
        """
        for block_id in reversed(seq.block_table):
            count = self.ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")
            self.ref_counts[block_id] = count
            if count == 0:
                if self._block_hash[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence uses."""
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            key = self._block_hash[block_id]
            if key is not None:
                del self._hash_to_block[key]
                self._block_hash[block_id] = None
            self._free.append(block_id)
