"""Page allocator: random allocate / share / free / cache sequences keep every invariant."""

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.kv.allocator import PageAllocator, page_keys

OPS = st.lists(st.tuples(st.sampled_from(["alloc", "free", "lookup", "register", "reset"]),
                         st.integers(0, 1000)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(num_pages=st.integers(1, 12), caching=st.booleans(), ops=OPS)
def test_random_sequences_keep_invariants_and_never_leak(num_pages, caching, ops):
    a = PageAllocator(num_pages, enable_prefix_caching=caching)
    held: list[list[int]] = []  # pages held by simulated requests
    prefixes = [page_keys(list(range(i, i + 12)), 4) for i in range(3)]  # 3 documents, 3 keys each
    for op, x in ops:
        if op == "alloc":
            if a.num_free:
                held.append([a.allocate() for _ in range(min(1 + x % 3, a.num_free))])
            else:
                try:
                    a.allocate()
                    raise AssertionError("allocate() must raise when no page is free")
                except MemoryError:
                    pass
        elif op == "free" and held:
            a.free(held.pop(x % len(held)))
        elif op == "lookup":
            keys = prefixes[x % 3]
            hits = a.lookup(keys)
            assert len(hits) <= len(keys)
            if hits:
                held.append(hits)
        elif op == "register" and held:
            pages = held[x % len(held)]
            for page, key in zip(pages, prefixes[x % 3]):
                a.register(page, key)
        elif op == "reset":
            a.reset_prefix_cache()
        a.check_invariants()
        refs = [0] * num_pages
        for pages in held:
            for p in pages:
                refs[p] += 1
        assert refs == a.ref
        assert a.num_free == sum(r == 0 for r in refs)
    for pages in held:
        a.free(pages)
    a.check_invariants()
    assert a.num_free == num_pages  # nothing leaked: free or evictable


def test_lru_eviction_takes_the_least_recently_freed_tail_first():
    a = PageAllocator(4, enable_prefix_caching=True)
    keys = page_keys(list(range(16)), 4)
    pages = [a.allocate() for _ in range(4)]
    for p, k in zip(pages, keys):
        a.register(p, k)
    a.free(pages)  # freed tail first: pages[3] is the least recently used
    assert a.num_free == 4 and a.num_cached == 4
    assert a.allocate() == pages[3]  # evicts the tail; the head of the prefix survives
    assert a.lookup(keys) == pages[:3]


def test_chained_keys_name_whole_prefixes():
    a, b = page_keys([1, 2, 3, 4, 5, 6, 7, 8], 4), page_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second page, different prefix
    assert page_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == a  # the partial page is never keyed
    assert page_keys([1, 2, 3, 4], 4, extra="int8") != page_keys([1, 2, 3, 4], 4, extra="auto")
