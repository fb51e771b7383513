"""Host-side page allocator with reference counts and a content-hashed prefix cache.

Pages are integers in [0, num_pages). A page is in exactly one of three states:
  free       ref 0, no hash        -> in `_free`
  cached     ref 0, has a hash     -> in `_evictable` (LRU order), reusable by a prefix hit
  in use     ref > 0               -> held by one or more requests (shared when > 1)
allocate / free / share are O(1). A full page is keyed by its content chained over
its parent page's key (vLLM's automatic prefix caching), so a key names the whole
prefix up to and including that page. Only full pages are ever keyed: the partial
last page of a request is never shared.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable, Sequence


class PageKey(tuple):
    """(parent key hash, page tokens, extra keys): equal keys mean equal prefixes."""


def page_keys(tokens: Sequence[int], page_size: int, extra: Hashable = None,
              parent: PageKey | None = None, start_page: int = 0) -> list[PageKey]:
    """Keys of every full page of tokens, chained from `parent` (the key before start_page)."""
    keys = []
    for i in range(start_page, len(tokens) // page_size):
        block = tuple(tokens[i * page_size:(i + 1) * page_size])
        parent = PageKey((hash(parent) if parent is not None else None, block, extra))
        keys.append(parent)
    return keys


class PageAllocator:
    def __init__(self, num_pages: int, enable_prefix_caching: bool = False):
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages} must be >= 1")
        self.num_pages = num_pages
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_pages
        self.key: list[PageKey | None] = [None] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[PageKey, int] = {}
        self.queries = 0  # prefix-cache lookups (pages looked up)
        self.hits = 0  # pages found

    # ------------------------------------------------------------------ capacity

    @property
    def num_free(self) -> int:
        """Pages that an allocation can take (truly free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    # ------------------------------------------------------------------ alloc / free

    def allocate(self) -> int:
        """One page (ref 1). Takes a free page, else evicts the least recently used cached one."""
        if self._free:
            page = self._free.popleft()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self.key[page]]
            self.key[page] = None
        else:
            raise MemoryError("no free KV pages")
        self.ref[page] = 1
        return page

    def share(self, page: int):
        """Take another reference to a page (a prefix-cache hit)."""
        if self.ref[page] == 0:
            self._evictable.pop(page)
        self.ref[page] += 1

    def free(self, pages: Sequence[int]):
        """Drop one reference to each page, tail first so a request's tail is evicted first."""
        for page in reversed(pages):
            self.ref[page] -= 1
            if self.ref[page] < 0:
                raise RuntimeError(f"page {page} freed more often than allocated")
            if self.ref[page] == 0:
                if self.key[page] is not None:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # ------------------------------------------------------------------ prefix cache

    def lookup(self, keys: Sequence[PageKey]) -> list[int]:
        """Longest run of cached pages matching keys from the start; each hit is shared."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in keys:
            page = self._cached.get(key)
            if page is None:
                break
            self.share(page)
            hits.append(page)
        return hits

    def record_lookup(self, queried: int, hit: int):
        """Count an admitted request's lookup in the hit-rate statistics."""
        self.queries += queried
        self.hits += hit

    def register(self, page: int, key: PageKey):
        """Mark a full, in-use page as holding the prefix `key` (idempotent)."""
        if not self.enable_prefix_caching or self.key[page] is not None:
            return
        if key in self._cached:  # same content computed twice: keep the first copy
            return
        self.key[page] = key
        self._cached[key] = page

    def reset_prefix_cache(self):
        for page in list(self._evictable):
            del self._cached[self.key[page]]
            self.key[page] = None
            self._free.append(page)
        self._evictable.clear()

    def check_invariants(self):
        """Every page in exactly one state; counts consistent (used by tests)."""
        free, evict = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evict
        for p in range(self.num_pages):
            if self.ref[p] > 0:
                assert p not in free and p not in evict, p
            elif self.key[p] is None:
                assert p in free, p
            else:
                assert p in evict, p
        assert all(self._cached[self.key[p]] == p for p in range(self.num_pages) if self.key[p] is not None)
        assert len(self._cached) == sum(k is not None for k in self.key)
