"""The dedup keys of stored reports: the compiled fingerprint table (engine/ingest/_seen.c)
behaves as the Python set it replaces, in much less memory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ingest import native
from engine.ingest.intake import KeySet, SeenReports

# As the receiver loads it: None where it is not built or is stale (the Python set runs).
_seen = native.load("_seen")

needs_table = pytest.mark.skipif(_seen is None, reason="engine.ingest._seen not built")
KEY = bytes(range(16))


def test_the_table_is_built_on_linux() -> None:
    # Optional at install; where we ship, the receiver must not fall back to a set
    # of tuples four times the size without anyone noticing.
    if not sys.platform.startswith("linux"):
        pytest.skip("checked where we ship")
    assert _seen is not None
    assert type(SeenReports(60).keys).__name__ == "KeyTable"


# SipHash-2-4 with a 128-bit output, written from the paper in Python, to check the C.
_M = 2**64 - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M


def _round(v: list[int]) -> list[int]:
    v0, v1, v2, v3 = v
    v0 = (v0 + v1) & _M
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _M
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _M
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _M
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return [v0, v1, v2, v3]


def siphash128(data: bytes, key: bytes) -> bytes:
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    v = [
        0x736F6D6570736575 ^ k0,
        0x646F72616E646F6D ^ k1 ^ 0xEE,
        0x6C7967656E657261 ^ k0,
        0x7465646279746573 ^ k1,
    ]
    whole = len(data) - len(data) % 8
    for at in range(0, whole, 8):
        m = int.from_bytes(data[at : at + 8], "little")
        v[3] ^= m
        v = _round(_round(v))
        v[0] ^= m
    b = ((len(data) << 56) & _M) | int.from_bytes(data[whole:], "little")
    v[3] ^= b
    v = _round(_round(v))
    v[0] ^= b
    v[2] ^= 0xEE
    for _ in range(4):
        v = _round(v)
    low = v[0] ^ v[1] ^ v[2] ^ v[3]
    v[1] ^= 0xDD
    for _ in range(4):
        v = _round(v)
    high = v[0] ^ v[1] ^ v[2] ^ v[3]
    return low.to_bytes(8, "little") + high.to_bytes(8, "little")


@needs_table
def test_siphash_matches_the_reference_vector() -> None:
    # The first of the reference implementation's 128-bit vectors (key 00..0f).
    expected = "a3817f04ba25a8e66df67214c7550293"
    assert _seen.siphash128(b"", KEY).hex() == expected
    assert siphash128(b"", KEY).hex() == expected


@needs_table
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(min_size=16, max_size=16))
def test_siphash_in_c_is_siphash(data: bytes, key: bytes) -> None:
    assert _seen.siphash128(data, key) == siphash128(data, key)


def tables() -> list[Callable[[], Any]]:
    made: list[Callable[[], Any]] = [KeySet]
    if _seen is not None:
        made.append(lambda: _seen.KeyTable(KEY))
    return made


call_ids = st.sampled_from(["a", "b", "x-1@10.0.0.5", "é", "通话", "\udcff", "", "a" * 300])
keys = st.tuples(call_ids, st.integers(0, 3))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(keys, max_size=6)),
        st.tuples(st.just("forget"), st.integers(0, 8)),
    ),
    max_size=30,
)


@pytest.mark.parametrize("make", tables(), ids=["set", "table"][: len(tables())])
@settings(max_examples=300, deadline=None)
@given(operations)
def test_a_table_is_a_set_that_forgets_oldest_first(
    make: Callable[[], Any], steps: list[tuple[str, Any]]
) -> None:
    # The model: a set, and the keys in the order added; forgetting the oldest n
    # removes each of them (also when added again since), as difference_update did.
    table, model, order = make(), set(), []
    for kind, value in steps:
        if kind == "add":
            assert table.add_batch(list(value)) == len(value)
            model.update(value)
            order.extend(value)
        elif value > len(order):
            with pytest.raises(ValueError, match=f"cannot forget {value} keys"):
                table.forget_oldest(value)
        else:
            table.forget_oldest(value)
            model.difference_update(order[:value])
            del order[:value]
        assert len(table) == len(model)
        for key in [(c, s) for c in ("a", "b", "é", "\udcff", "", "a" * 300) for s in range(4)]:
            assert (key in table) == (key in model)
        assert table.isdisjoint([("zz", 9), ("a", 0)]) == (("a", 0) not in model)


@pytest.mark.parametrize("make", tables(), ids=["set", "table"][: len(tables())])
def test_growing_and_shrinking_keeps_every_key(make: Callable[[], Any]) -> None:
    table = make()
    batches = [[(f"call-{b}-{n}", n % 3) for n in range(2_000)] for b in range(50)]
    for batch in batches:
        table.add_batch(batch)
    assert len(table) == 100_000
    for done, batch in enumerate(batches[:45], 1):
        table.forget_oldest(len(batch))
        assert len(table) == 100_000 - 2_000 * done
    assert all(key in table for batch in batches[45:] for key in batch)
    assert not any(key in table for batch in batches[:45] for key in batch)
    table.forget_oldest(10_000)
    assert len(table) == 0


@needs_table
def test_a_bad_key_changes_nothing() -> None:
    table = _seen.KeyTable(KEY)
    table.add_batch([("a", 1)])
    for bad in ([("b", 1), ("c", "1")], [("b", 1), ("c",)], [("b", 1), "c,1"], [("b", 2**64)]):
        with pytest.raises((TypeError, OverflowError)):
            table.add_batch(bad)
        assert len(table) == 1 and ("b", 1) not in table
    table.forget_oldest(1)  # only the one good batch was ever added
    with pytest.raises(ValueError):
        table.forget_oldest(1)
    with pytest.raises(ValueError, match="16-byte"):
        _seen.KeyTable(b"short")


@needs_table
def test_a_key_costs_under_64_bytes() -> None:
    # The Python set held about 190 bytes a key (tuple, call id, slot): an hour of
    # 5,000 reports/s was over 3 GiB. The table holds fingerprints only.
    table = _seen.KeyTable(KEY)
    for start in range(0, 1_000_000, 500):
        table.add_batch([(f"{n:x}-a8f2@10.20.30.40", 1) for n in range(start, start + 500)])
    assert len(table) == 1_000_000
    assert table.nbytes / len(table) < 64


@pytest.mark.parametrize("make", tables(), ids=["set", "table"][: len(tables())])
def test_seen_reports_forget_what_left_the_horizon(
    make: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.ingest.intake._key_table", make)
    seen = SeenReports(60.0)
    seen.add_batch([("a", 1), ("b", 1)], 100.0)
    seen.add((("c", 1)), 130.0)
    seen.forget_before(160.0)  # the horizon reaches back to 100: both kept
    assert ("a", 1) in seen and ("c", 1) in seen and len(seen) == 3
    seen.forget_before(160.5)
    assert ("a", 1) not in seen and ("b", 1) not in seen and ("c", 1) in seen
    seen.forget_before(1_000.0)
    assert len(seen) == 0


@pytest.mark.parametrize("make", tables(), ids=["set", "table"][: len(tables())])
@pytest.mark.parametrize("seed", [3, 11])
def test_seen_reports_hold_at_most_max_keys_the_newest_and_count_the_rest(
    make: Callable[[], Any], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import random

    monkeypatch.setattr("engine.ingest.intake._key_table", make)
    rng = random.Random(seed)
    seen = SeenReports(3600.0, max_keys=1_000)
    added: list[tuple[str, int]] = []
    forgotten = 0
    for batch in range(60):
        keys = [(f"call-{batch}-{n}", 1) for n in range(rng.randint(1, 120))]
        forgotten += seen.add_batch(keys, 100.0 + batch)
        added.extend(keys)
        seen.forget_before(100.0 + batch)  # well within the hour: time forgets nothing
        assert len(seen) == min(len(added), 1_000)
    assert forgotten == seen.forgotten_early == len(added) - 1_000
    assert all(key in seen for key in added[-1_000:])
    assert not any(key in seen for key in added[:-1_000])
    # Time still forgets what is left, batch by batch, with the bound's cuts counted right.
    seen.forget_before(100.0 + 3600.0 + 40.5)
    assert len(seen) == sum(1 for key in added[-1_000:] if int(key[0].split("-")[1]) > 40)
    seen.forget_before(10_000.0)
    assert len(seen) == 0
