"""The page pool alone: reference counts, prefix matching by chained SHA-256 digests, LRU eviction, accounting."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from moemesh.engine.kv_pages import OutOfPages, PagePool, page_hashes


def full(pool: PagePool, pages: list[int], tokens: list[int]) -> None:
    """Registers `pages` as holding the full pages of `tokens`."""
    for page, digest in zip(pages, page_hashes(tokens, pool.page_size, len(pages)), strict=True):
        pool.register(page, digest)


def test_allocate_release_and_accounting():
    pool = PagePool(6, 4)
    a = pool.allocate(4)
    assert len(set(a)) == 4 and pool.stats().pages_leased == 4 and pool.num_available == 2
    with pytest.raises(OutOfPages):
        pool.allocate(3)
    pool.release(a)
    st = pool.stats()
    assert (st.pages_free, st.pages_cached, st.pages_leased) == (6, 0, 0)
    with pytest.raises(ValueError, match="released more often"):
        pool.release(a[:1])


def test_shared_pages_count_references():
    pool = PagePool(4, 2)
    tokens = [5, 6, 7, 8, 9]
    pages = pool.allocate(3)
    full(pool, pages[:2], tokens)
    hits = pool.match_prefix(tokens, 2)
    assert hits == pages[:2]
    pool.acquire(hits)
    assert [pool.ref_count(p) for p in pages] == [2, 2, 1]
    pool.release(pages)
    assert pool.stats().pages_leased == 2 and pool.stats().pages_cached == 0
    pool.release(hits)
    assert pool.stats().pages_cached == 2 and pool.stats().pages_free == 2


def test_prefix_match_is_chained_and_checks_tokens():
    pool = PagePool(8, 2)
    a = [1, 2, 3, 4, 5, 6]
    pages = pool.allocate(3)
    full(pool, pages, a)
    pool.release(pages)
    assert pool.match_prefix(a, 3) == pages
    assert pool.match_prefix(a, 2) == pages[:2]
    assert pool.match_prefix([1, 2, 3, 9, 5, 6], 3) == pages[:1]  # page 2 differs: so does every hash after
    assert pool.match_prefix([9, 9, 3, 4], 2) == []  # same page 1 tokens, different prefix
    assert PagePool(8, 2, enable_prefix_caching=False).match_prefix(a, 3) == []


def test_eviction_is_least_recently_freed_first_tail_first():
    pool = PagePool(4, 2)
    x, y = pool.allocate(2), pool.allocate(2)
    full(pool, x, [1, 2, 3, 4])
    full(pool, y, [5, 6, 7, 8])
    pool.release(x)
    pool.release(y)
    assert pool.num_available == 4 and pool.stats().pages_free == 0
    got = pool.allocate(1)
    assert got == [x[1]]  # x was freed first, its tail page goes first
    assert pool.match_prefix([1, 2, 3, 4], 2) == [x[0]]
    assert pool.match_prefix([5, 6, 7, 8], 2) == y
    pool.acquire(pool.match_prefix([5, 6, 7, 8], 2))  # a hit takes cached pages out of the LRU
    assert pool.allocate(1) == [x[0]]
    with pytest.raises(OutOfPages):
        pool.allocate(1)


def test_duplicate_hash_keeps_the_first_page():
    pool = PagePool(4, 2)
    a, b = pool.allocate(1), pool.allocate(1)
    full(pool, a, [3, 4])
    full(pool, b, [3, 4])
    pool.release(a + b)
    assert pool.match_prefix([3, 4], 1) == a
    assert pool.stats().pages_free == 3 and pool.stats().pages_cached == 1  # b kept nothing


def test_page_keys_are_sha256_of_the_parent_digest_and_the_page_tokens():
    """The oracle: hashlib directly. Before, the keys were chained Python hash() of token tuples (64 bits,
    and a hit compared only the page's own tokens, so a collision in a parent returned another prefix's KV)."""
    tokens = [7, 300000, 0, 2**40, 5, 6, 7, 8, 9]  # two full pages of 4 (ids need not fit in 32 bits)
    d0 = hashlib.sha256(bytes(32) + struct.pack("<4q", 7, 300000, 0, 2**40)).digest()
    d1 = hashlib.sha256(d0 + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert page_hashes(tokens, 4, 2) == [d0, d1]
    assert page_hashes(tokens, 4, 2, start=1, prev=d0) == [d1]


def test_page_keys_are_the_same_in_every_process():
    code = (
        "from moemesh.engine.kv_pages import page_hashes; print(page_hashes(list(range(8)), 4, 2)[-1].hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == page_hashes(list(range(8)), 4, 2)[-1].hex()


def test_a_hit_needs_the_whole_prefix_not_only_the_pages_own_tokens():
    pool = PagePool(8, 2)
    pages = pool.allocate(2)
    full(pool, pages, [1, 2, 3, 4])
    pool.release(pages)
    assert pool.match_prefix([1, 2, 3, 4], 2) == pages
    assert pool.match_prefix([9, 2, 3, 4], 2) == []  # page 1 has the same tokens, its prefix differs
    assert pool.match_prefix([1, 2, 3, 5], 2) == pages[:1]
