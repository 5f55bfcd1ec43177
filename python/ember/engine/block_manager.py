"""BlockManager: the paged KV cache's blocks, their reference counts and the prefix cache.

The cache holds ``num_blocks`` blocks of ``block_size`` token slots. A sequence's
``block_table`` lists its blocks in order; token ``t`` lives in slot
``block_table[t // block_size] * block_size + t % block_size``.

Prefix caching: a block whose slots are all computed gets a hash chained from its
predecessor's (sha256 over the previous hash and the block's token ids), so the hash names the
whole prefix. A new sequence reuses the longest run of its leading full blocks found in the
cache, each confirmed against the stored token ids. Blocks are shared by reference count; a
block whose count drops to 0 goes to the free queue but keeps its contents and hash, so it can
still be reused until it is evicted: the free queue hands out the least recently freed block
first (blocks holding nothing reusable before any of them).

Blocks enter the prefix cache once a step has computed them (``cache_full_blocks``).
"""

import hashlib
from array import array
from collections import OrderedDict

import numpy as np

from ember.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set once the block is full and registered
        self.token_ids: tuple = ()

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, cached={self.hash is not None})"


def block_tables(seqs: list) -> np.ndarray:
    """int32 ``[len(seqs), longest table]``: each sequence's block table, zero-padded."""
    tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int32)
    for row, seq in enumerate(seqs):
        tables[row, :len(seq.block_table)] = seq.block_table
    return tables


def slot_mapping(tables: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                 block_size: int) -> np.ndarray:
    """int64 cache slots of tokens at ``positions`` of the sequences whose block tables are
    ``tables[rows]``: ``block * block_size + position % block_size``."""
    blocks = tables[rows, positions // block_size].astype(np.int64)
    return blocks * block_size + positions % block_size


def chain_hash(previous: bytes | None, token_ids) -> bytes:
    """The hash of a full block given its predecessor's hash (None for the first block)."""
    h = hashlib.sha256(previous or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front first); an OrderedDict for O(1) removal of a
        # free block that a prefix hit brings back.
        self.free: OrderedDict = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict = {}  # hash -> block id
        # Per-sequence hashes of its full blocks (token contents never change, so they survive
        # preemption): request_id -> list of hashes.
        self._hashes: dict = {}
        # Per-sequence count of leading blocks already offered to the prefix cache, so each
        # step looks only at blocks that filled since (request_id -> int; reset when the
        # sequence's blocks are released).
        self._offered: dict = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list:
        hashes = self._hashes.setdefault(seq.request_id, [])
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else None,
                                     seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list:
        """Blocks holding the longest cached prefix of ``seq`` (no side effects).

        Stops before the block holding the last token: that token must be computed to give
        logits.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        found = []
        for i, h in enumerate(self._block_hashes(seq, (len(seq) - 1) // bs)):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # a hash collision: never share blocks whose tokens differ
            found.append(block_id)
        return found

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks=()) -> bool:
        """Give ``seq`` the blocks to compute its next ``num_new_tokens`` tokens.

        ``cached_blocks`` (from ``find_cached_prefix``, only for a sequence without blocks)
        are shared first and count as computed. Returns False, changing nothing, if too few
        blocks are free.
        """
        cached_blocks = list(cached_blocks)
        if cached_blocks and seq.block_table:
            raise ValueError("cached blocks can only start a sequence's block table")
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_fresh = -(-total // self.block_size) - len(seq.block_table) - len(cached_blocks)
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if max(num_fresh, 0) + reclaimed > len(self.free):
            return False

        if not seq.block_table:  # admission: account the prefix-cache lookup
            self.prefix_query_tokens += len(seq)
            self.prefix_hit_tokens += len(cached_blocks) * self.block_size
            seq.num_cached_tokens = len(cached_blocks) * self.block_size
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = num_computed
        for _ in range(num_fresh):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Enter ``seq``'s blocks whose slots are all computed into the prefix cache.

        Called after a step has run, never when scheduling it: within a step a block's K/V
        are written by one attention call and may be read by another before that, so only
        blocks computed by earlier steps can be shared.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full_blocks = seq.num_computed_tokens // bs
        first = self._offered.get(seq.request_id, 0)
        if first >= num_full_blocks:
            return
        hashes = self._block_hashes(seq, num_full_blocks)
        self._offered[seq.request_id] = num_full_blocks
        for i in range(first, num_full_blocks):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None or hashes[i] in self.cached:
                continue  # already cached (maybe a duplicate computed in parallel)
            block.hash = hashes[i]
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self.cached[block.hash] = block.block_id

    def free_sequence(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (finished, aborted or preempted)."""
        # Tail blocks first, so a sequence's later blocks are evicted before its prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing reusable: hand it out first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._offered.pop(seq.request_id, None)

    def forget(self, seq: Sequence) -> None:
        """Drop the bookkeeping of a sequence that has left the engine."""
        self._hashes.pop(seq.request_id, None)
