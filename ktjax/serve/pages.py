"""Which page of the paged cache (ktjax/kv/paged.py) holds what: a free list, reference counts, and a prefix
cache of full pages keyed by a chain of their tokens. Pure Python, no JAX.

A published full page holding tokens t[i*P:(i+1)*P] of a sequence gets an id, never reused, and is found by
(id of the page before it, those tokens): an id names the whole prefix up to its page's end. The cache matches
those tokens exactly (a dict compares the keys it hashes alike), so no two prompts that differ can ever share a
page: a hash alone would let a crafted prompt whose pages hash like another user's document read that
document's cache. Pages are shared read-only: only FULL pages are ever published, and a sequence's partial last
page is always its own, so no page is written while shared. A page whose last reference goes stays cached
(least recently used first out) until a new allocation needs it.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools

from ktjax.errors import KtjaxError

ROOT = 0  # the id "before" a sequence's first page


def page_key(parent: int, tokens) -> tuple[int, tuple[int, ...]]:
    """What the prefix cache finds a page by: the id of the page before it and its tokens, compared exactly."""
    return parent, tuple(int(t) for t in tokens)


@dataclasses.dataclass
class PageStats:
    total: int
    used: int          # referenced by at least one sequence
    free: int          # on the free list
    cached: int        # unreferenced but kept for the prefix cache (reclaimable)
    hit_tokens: int    # prompt tokens found in the prefix cache
    lookup_tokens: int  # prompt tokens looked up


class PageAllocator:
    def __init__(self, n_pages: int, page_size: int, order: list[int] | None = None):
        """order: the free list's initial order (all pages once), e.g. round-robin over devices."""
        if n_pages < 1 or page_size < 1:
            raise KtjaxError(f"the page pool needs at least one page of at least one token; got {n_pages} pages "
                             f"of {page_size}")
        if order is not None and sorted(order) != list(range(n_pages)):
            raise KtjaxError("order must list every page once")
        self.n_pages, self.page_size = n_pages, page_size
        self._free = collections.deque(range(n_pages) if order is None else order)
        self._refs = [0] * n_pages
        self._key_of: dict[int, tuple] = {}          # page -> its key, for published pages
        self._id_of: dict[int, int] = {}             # page -> its id, for published pages
        self._page_of: dict[tuple, int] = {}         # key -> page
        self._ids = itertools.count(ROOT + 1)
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unreferenced published pages
        self.hit_tokens = 0
        self.lookup_tokens = 0

    # -- capacity -------------------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Pages an allocation can take now: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._lru)

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    # -- allocation ------------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n private pages (reference count 1), evicting least recently used cached pages when the free list
        runs out; raises KtjaxError when fewer than n are available (nothing is taken then)."""
        if n > self.available:
            raise KtjaxError(f"{n} pages requested, {self.available} available of {self.n_pages}")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._lru.popitem(last=False)
                del self._page_of[self._key_of.pop(page)], self._id_of[page]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages) -> None:
        """Drop one reference to each page; a page nobody holds goes back to the free list, or, when
        published, to the cache. Release a sequence's pages first to last: its later pages (less likely to be
        shared) are then evicted first."""
        for page in reversed(list(pages)):
            if self._refs[page] <= 0:
                raise KtjaxError(f"page {page} released more often than it was taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    # -- prefix cache -----------------------------------------------------------------------------------------
    def lookup(self, tokens, max_pages: int | None = None, count: bool = True) -> tuple[list[int], list[int]]:
        """The longest run of cached full pages that starts `tokens` (at most max_pages), each taken with one
        more reference. -> (pages, their ids). Counts the looked-up and hit tokens unless count=False (then
        the caller counts with count_lookup once it keeps them)."""
        ps = self.page_size
        n_full = len(tokens) // ps if max_pages is None else min(len(tokens) // ps, max_pages)
        pages, ids, parent = [], [], ROOT
        for i in range(n_full):
            page = self._page_of.get(page_key(parent, tokens[i * ps:(i + 1) * ps]))
            if page is None:
                break
            pages.append(page)
            parent = self._id_of[page]
            ids.append(parent)
        for page in pages:
            self._take(page)
        if count:
            self.count_lookup(len(pages) * ps, len(tokens))
        return pages, ids

    def count_lookup(self, hit_tokens: int, lookup_tokens: int) -> None:
        self.hit_tokens += hit_tokens
        self.lookup_tokens += lookup_tokens

    def publish(self, page: int, parent: int, tokens) -> int:
        """Offer a full page (held by the caller) holding `tokens` after the prefix with id `parent` to the
        cache. -> the id that names this prefix, for the next page's `parent`. When an equal page is already
        cached, the page stays private (the cache keeps one) and that page's id is returned."""
        if len(tokens) != self.page_size:
            raise KtjaxError(f"only full pages ({self.page_size} tokens) are shared; got {len(tokens)}")
        if self._refs[page] <= 0:
            raise KtjaxError(f"page {page} is not held; publish it before releasing it")
        key = page_key(parent, tokens)
        cached = self._page_of.get(key)
        if cached is not None:
            return self._id_of[cached]
        if page in self._key_of:  # already published under another prefix: this prefix stays uncached
            return next(self._ids)
        self._page_of[key], self._key_of[page], self._id_of[page] = page, key, next(self._ids)
        return self._id_of[page]

    def _take(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._lru[page]
        self._refs[page] += 1

    # -- introspection ------------------------------------------------------------------------------------------
    def refcount(self, page: int) -> int:
        return self._refs[page]

    def stats(self) -> PageStats:
        return PageStats(total=self.n_pages, used=sum(1 for r in self._refs if r > 0), free=len(self._free),
                         cached=len(self._lru), hit_tokens=self.hit_tokens, lookup_tokens=self.lookup_tokens)

    def check(self) -> None:
        """Invariants (for tests): every page is exactly one of used, free or cached-unreferenced; the cache's
        two maps agree."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free), "a page is twice on the free list"
        assert not free & lru, "a page is both free and cached"
        for page, refs in enumerate(self._refs):
            assert refs >= 0
            assert (refs > 0) + (page in free) + (page in lru) == 1, f"page {page}: refs {refs}"
            assert page not in free or page not in self._key_of, f"free page {page} still published"
        assert lru <= set(self._key_of) and set(self._id_of) == set(self._key_of)
        assert all(self._page_of[k] == p for p, k in self._key_of.items()) and len(self._page_of) == len(self._key_of)
        assert len(set(self._id_of.values())) == len(self._id_of), "two pages share an id"
