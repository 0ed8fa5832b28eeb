"""The page pool of the paged latent KV cache: reference counts, a prefix cache, and the accounting view.

Pure Python (no torch): it hands out page *ids*; the runner owns the tensors. A page is in one of three states:

* **leased**: held by at least one request (ref count > 0) — running, waiting with pages, reserved for an
  incoming KV transfer, or handed out after a prefill.
* **cached**: nobody holds it, but it keeps the KV of a full page of tokens under its chained digest, so a later
  request with the same prefix reuses it. Cached pages are evicted least recently freed first when the free
  list runs dry.
* **free**: nobody holds it and it keeps nothing.

Prefix cache: full page j of a token sequence is keyed by the digest
`d_j = sha256(d_{j-1} || tokens of page j as little-endian int64)`, with `d_{-1}` = 32 zero bytes, so one
digest names the whole prefix up to and including that page. A hit is a page registered under the same
digest: its KV is the KV of exactly these tokens at exactly these positions unless two different prefixes
have the same SHA-256 digest (a collision nobody has ever exhibited). Digests do not depend on the process
(no PYTHONHASHSEED) or the machine, and cost about a microsecond per page.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_DIGEST = bytes(32)  # the "parent" of a sequence's first page


def page_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """sha256(parent || tokens as little-endian int64): the key of a full page whose prefix is `parent`."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


def page_hashes(
    token_ids: Sequence[int], page_size: int, num_pages: int, start: int = 0, prev: bytes = ROOT_DIGEST
) -> list[bytes]:
    """Chained digests of full pages `start .. num_pages - 1` of `token_ids`; `prev` is the digest of page
    `start - 1` (ROOT_DIGEST for the first page)."""
    out = []
    for j in range(start, num_pages):
        prev = page_digest(prev, token_ids[j * page_size : (j + 1) * page_size])
        out.append(prev)
    return out


@dataclass(frozen=True)
class PageStats:
    pages_total: int
    pages_free: int
    pages_cached: int
    pages_leased: int


class OutOfPages(RuntimeError):
    """More pages were asked for than are free or evictable; callers check `num_available` first."""


class PagePool:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_pages
        self._hash: list[bytes | None] = [None] * num_pages  # digest of the full page (and prefix) it holds
        self._by_hash: dict[bytes, int] = {}  # digest -> page
        self._free: deque[int] = deque(range(num_pages))  # ref 0, keeps nothing
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0, keeps a hashed page; oldest first

    # -- accounting -----------------------------------------------------------------------------------------

    @property
    def num_available(self) -> int:
        """Pages `allocate` can hand out now: free plus evictable cached."""
        return len(self._free) + len(self._cached)

    def stats(self) -> PageStats:
        free, cached = len(self._free), len(self._cached)
        return PageStats(self.num_pages, free, cached, self.num_pages - free - cached)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    # -- allocation -----------------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n pages with ref count 1, taken from the free list first, then by evicting the oldest cached."""
        if n > self.num_available:
            raise OutOfPages(f"asked for {n} pages, {self.num_available} available")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._cached.popitem(last=False)
                self._forget(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def acquire(self, pages: Sequence[int]) -> None:
        """Adds a reference to pages found by `match_prefix` (a cached page becomes leased again)."""
        for page in pages:
            if self._refs[page] == 0:
                del self._cached[page]
            self._refs[page] += 1

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference from each page, last page first (so a prefix's tail is evicted before its
        head). A page nobody holds becomes cached if it has a hash, else free."""
        for page in reversed(pages):
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} released more often than held")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if self._hash[page] is None:
                    self._free.append(page)
                else:
                    self._cached[page] = None

    # -- prefix cache ---------------------------------------------------------------------------------------

    def num_evictable_in(self, pages: Sequence[int]) -> int:
        """How many of `pages` are cached (ref 0): acquiring them takes them out of `num_available`."""
        return sum(1 for p in pages if self._refs[p] == 0)

    def match_prefix(self, token_ids: Sequence[int], max_pages: int) -> list[int]:
        """The longest run of leading full pages of `token_ids` (at most `max_pages`) whose KV some page
        keeps; their ids in order. Takes no reference (call `acquire`)."""
        if not self.enable_prefix_caching:
            return []
        pages, prev = [], ROOT_DIGEST
        for j in range(max_pages):
            prev = page_digest(prev, token_ids[j * self.page_size : (j + 1) * self.page_size])
            page = self._by_hash.get(prev)
            if page is None:
                break
            pages.append(page)
        return pages

    def register(self, page: int, digest: bytes) -> None:
        """Records that leased `page` now keeps the KV of the full page whose chained digest (`page_hashes`)
        is `digest`. A digest already kept by another page is left alone (the request keeps its own copy)."""
        if not self.enable_prefix_caching or digest in self._by_hash or self._hash[page] is not None:
            return
        self._hash[page] = digest
        self._by_hash[digest] = page

    def _forget(self, page: int) -> None:
        h = self._hash[page]
        if h is not None:
            del self._by_hash[h]
            self._hash[page] = None
