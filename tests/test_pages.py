"""The page allocator (ktjax/serve/pages.py): free list, reference counts, prefix cache by hash chain, LRU
eviction, stats; randomized alloc/share/free sequences keep the invariants (no leak, no double free)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktjax.errors import KtjaxError
from ktjax.serve.pages import ROOT, PageAllocator

PS = 4


def publish_all(alloc, pages, tokens):
    parent = ROOT
    for i, page in enumerate(pages[:len(tokens) // PS]):
        parent = alloc.publish(page, parent, tokens[i * PS:(i + 1) * PS])


def test_allocate_release_and_errors():
    alloc = PageAllocator(6, PS)
    a = alloc.allocate(4)
    assert len(set(a)) == 4 and alloc.available == 2
    with pytest.raises(KtjaxError, match="5 pages requested, 2 available of 6"):
        alloc.allocate(5)
    assert alloc.available == 2  # a refused allocation takes nothing
    alloc.release(a)
    assert alloc.stats().free == 6 and alloc.stats().used == 0
    with pytest.raises(KtjaxError, match="released more often"):
        alloc.release(a[:1])
    alloc.check()


def test_prefix_hits_share_full_pages_only():
    alloc = PageAllocator(8, PS)
    prompt = list(range(10))  # two full pages and a partial one
    pages = alloc.allocate(3)
    publish_all(alloc, pages, prompt)
    hits, _ = alloc.lookup(prompt[:8] + [99, 98])
    assert hits == pages[:2] and alloc.refcount(pages[0]) == 2
    miss, _ = alloc.lookup([0, 1, 2, 5] + prompt[4:])  # first page differs: the chain breaks at once
    assert miss == []
    half, _ = alloc.lookup(prompt, max_pages=1)
    assert half == pages[:1]
    s = alloc.stats()
    assert s.hit_tokens == 3 * PS and s.lookup_tokens == 30
    alloc.release(pages)
    alloc.release(hits)
    alloc.release(half)
    s = alloc.stats()
    assert s.used == 0 and s.cached == 2 and s.free == 6  # the published full pages stay cached
    again, _ = alloc.lookup(prompt)
    assert again == pages[:2]
    alloc.release(again)
    alloc.check()


def test_least_recently_used_cached_page_is_evicted_first():
    alloc = PageAllocator(3, PS)
    old, new = alloc.allocate(1), alloc.allocate(1)
    publish_all(alloc, old, [1, 1, 1, 1])
    publish_all(alloc, new, [2, 2, 2, 2])
    alloc.release(old)
    alloc.release(new)
    alloc.allocate(2)  # the free page, then the older cached one
    assert alloc.lookup([1, 1, 1, 1])[0] == [] and alloc.lookup([2, 2, 2, 2])[0] == new
    alloc.check()


def test_publishing_a_duplicate_keeps_one_cached_copy():
    alloc = PageAllocator(4, PS)
    a, b = alloc.allocate(1), alloc.allocate(1)
    publish_all(alloc, a, [3] * PS)
    publish_all(alloc, b, [3] * PS)
    alloc.release(b)
    assert alloc.stats().free == 3  # b stayed private
    with pytest.raises(KtjaxError, match="only full pages"):
        alloc.publish(a[0], ROOT, [1, 2])
    alloc.check()


@pytest.mark.parametrize("stored, asked", [
    ([-1, 0, 0, 0], [-2, 0, 0, 0]),   # hash(-1) == hash(-2) in CPython: the two pages' tuples hash alike
    ([5, 6, 7, 8], [5, 6, 7, 9]),     # plain different pages
])
def test_pages_that_hash_alike_are_told_apart_by_their_tokens(stored, asked):
    """A prompt must never read another prompt's page unless their tokens agree: with pages found by a hash of
    the tokens alone, a page hashing like another user's would have returned that user's cache."""
    assert hash((ROOT, tuple(stored))) == hash((ROOT, tuple(asked))) or stored[-1] != asked[-1]
    alloc = PageAllocator(4, PS)
    mine = alloc.allocate(2)
    publish_all(alloc, mine, stored + [1, 2, 3, 4])
    assert alloc.lookup(asked + [1, 2, 3, 4], count=False)[0] == []
    hits, ids = alloc.lookup(stored + [1, 2, 3, 4], count=False)
    assert hits == mine and len(set(ids)) == 2 and ROOT not in ids
    alloc.release(hits)
    alloc.check()


def test_an_evicted_page_takes_its_id_along():
    """A page evicted and then published again for another prefix gets a new id, so the pages cached after the
    old prefix are not found after the new one."""
    alloc = PageAllocator(3, PS)
    first = alloc.allocate(2)
    publish_all(alloc, first, [1] * PS + [2] * PS)
    alloc.release(first[:1])              # the first page cached, unreferenced; the second still held
    [page] = alloc.allocate(1)            # the free page
    assert alloc.lookup([1] * PS, count=False)[0] == first[:1]
    alloc.release(first[:1])
    [reused] = alloc.allocate(1)          # evicts the first page
    assert reused == first[0] and alloc.lookup([1] * PS + [2] * PS, count=False)[0] == []
    publish_all(alloc, [reused], [3] * PS)
    assert alloc.lookup([3] * PS + [2] * PS, count=False)[0] == [reused]   # not first[1]: another prefix
    alloc.release([reused, reused, page, first[1]])
    alloc.check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(1, 14)), max_size=40))
def test_random_sequences_keep_the_invariants(ops):
    """Requests (prompts drawn from 3 prefix families) come and go; each takes its prefix hits plus fresh
    pages, publishes its full pages, and releases all of them when it leaves."""
    alloc = PageAllocator(12, PS)
    live = []
    for op, family, length in ops:
        if op == 0 and live:  # a request leaves
            alloc.release(live.pop(length % len(live)))
        else:
            prompt = [family] * PS + list(range(family, family + length))
            need = -(-len(prompt) // PS)
            hits, _ = alloc.lookup(prompt, count=False)
            if need - len(hits) > alloc.available:
                alloc.release(hits)
            else:
                pages = hits + alloc.allocate(need - len(hits))
                publish_all(alloc, pages, prompt)
                live.append(pages)
        alloc.check()
        held = sum(len(p) for p in live)
        assert sum(alloc.refcount(p) for p in range(12)) == held
    for pages in live:
        alloc.release(pages)
    alloc.check()
    s = alloc.stats()
    assert s.used == 0 and s.free + s.cached == 12
