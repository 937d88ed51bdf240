"""SlotPool's replacement (probation queue, ghost record, CLOCK with use counts) and its invariants."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from damo_hybrid.cache.slots import SlotPool


def _fill(pool: SlotPool, keys) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint64)
    slots = pool.take(len(keys), lambda v: None)
    pool.assign(keys, slots)
    return slots


def _resident(pool: SlotPool, keys) -> list[int]:
    keys = np.asarray(keys, dtype=np.uint64)
    return keys[pool.lookup(keys) >= 0].tolist()


def test_rows_seen_once_leave_first_oldest_first():
    pool = SlotPool(20, "test pool")
    _fill(pool, range(10))
    pool.touch(pool.lookup(np.arange(10, dtype=np.uint64)))  # found again: main part
    _fill(pool, range(100, 110))  # on probation, in this order
    _fill(pool, range(200, 205))  # needs 5: the 5 oldest probation rows go, no main row
    assert _resident(pool, range(10)) == list(range(10))
    assert _resident(pool, range(100, 110)) == list(range(105, 110))


def test_a_key_evicted_from_probation_and_back_soon_enters_the_main_part():
    pool = SlotPool(20, "test pool")
    _fill(pool, range(20))  # all on probation
    _fill(pool, range(100, 110))  # evicts keys 0..9 from probation (into the ghost record)
    _fill(pool, [3])  # back: enters the main part
    assert not pool.probation[pool.lookup(np.array([3], dtype=np.uint64))][0]
    assert pool.probation[pool.lookup(np.array([100], dtype=np.uint64))][0]


def test_pinned_probation_rows_stay_and_wait_their_turn_again():
    pool = SlotPool(10, "test pool")
    slots = _fill(pool, range(10))
    pool.pin(slots[:3])  # keys 0..2: a batch in flight
    _fill(pool, range(100, 103))
    assert _resident(pool, range(10)) == [0, 1, 2, 6, 7, 8, 9]
    pool.unpin(slots[:3])


def test_trimming_the_queue_leaves_a_slot_filled_again_since_on_probation():
    """Trimming the oldest queue entry took every slot in it off probation, also one whose row had
    left and whose slot held a new row on probation since (queued in a newer entry)."""
    pool = SlotPool(10, "test pool")
    slots = _fill(pool, range(10))  # one entry of 10, all on probation
    pool.release(slots[:1])  # key 0 leaves; its slot is free
    (again,) = _fill(pool, [50])  # the slot again, in a newer entry: the queue holds 11 > 10
    assert again == slots[0]
    assert pool.probation[again]  # still on probation: the trimmed entry was stale for it
    assert not pool.probation[slots[1:]].any()  # the rest of the trimmed entry joined the main part
    assert pool._on_probation == 1


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(["load", "touch", "pin", "unpin", "release"]),
                          st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True)),
                min_size=1, max_size=60))
def test_victims_are_distinct_unpinned_and_the_map_stays_exact(ops):
    cap = 16
    pool = SlotPool(cap, "test pool")
    model: dict[int, int] = {}  # key -> slot
    pins: dict[int, int] = {}
    for op, ks in ops:
        keys = np.array(ks, dtype=np.uint64)
        slots = pool.lookup(keys)
        if op == "load":
            miss = keys[slots < 0]
            if len(miss) + sum(1 for k in pins if pins[k] and k not in set(ks)) > cap:
                continue  # more than the unpinned slots: refused, not tested here
            hit = slots[slots >= 0]
            pool.pin(hit)
            evicted: list[np.ndarray] = []
            got = pool.take(len(miss), lambda v: evicted.append(pool.keys[v].copy()))
            pool.unpin(hit)
            assert len(set(got.tolist())) == len(got) == len(miss)
            for e in evicted:
                for k in e.tolist():
                    assert not pins.get(k) and k not in set(ks)
                    del model[k]
            pool.assign(miss, got)
            model.update(zip(miss.tolist(), got.tolist()))
            pool.touch(hit)
        elif op == "touch":
            pool.touch(slots[slots >= 0])
        elif op == "pin":
            s = slots >= 0
            pool.pin(slots[s])
            for k in keys[s].tolist():
                pins[k] = pins.get(k, 0) + 1
        elif op == "unpin":
            s = np.array([k in pins and pins[k] > 0 for k in ks])
            pool.unpin(slots[s])
            for k in keys[s].tolist():
                pins[k] -= 1
        else:
            s = np.array([k in model and not pins.get(k) for k in ks])
            pool.release(slots[s])
            for k in keys[s].tolist():
                del model[k]
        all_keys = np.arange(61, dtype=np.uint64)
        found = pool.lookup(all_keys)
        assert {int(k): int(v) for k, v in zip(all_keys, found) if v >= 0} == model
        assert len(pool) == len(model) and pool.occupied.sum() == len(model)
        on = np.flatnonzero(pool.probation)
        assert pool._on_probation == len(on) and pool.occupied[on].all()
        current = [s for e, q in pool._fifo for s in q.tolist() if pool._entry[s] == e]
        assert set(on.tolist()) <= set(current)  # every probation row waits in the queue once
