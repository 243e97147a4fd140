import random

import pytest

from engine.kv_slots import SlotManager, SlotMove


def test_free_moves_last_row_into_hole():
    slots = SlotManager(4)
    for owner in "abcd":
        slots.allocate(owner)
    assert slots.free("b") == SlotMove(src=3, dst=1)
    assert slots.owners() == ["a", "d", "c"]
    assert slots.slot_of("d") == 1
    assert slots.free("c") is None  # the last row leaves no hole
    slots.check_integrity()


def test_allocation_is_bounded_and_rejects_duplicates():
    slots = SlotManager(2)
    slots.allocate("a")
    with pytest.raises(ValueError, match="already holds"):
        slots.allocate("a")
    slots.allocate("b")
    assert not slots.can_allocate()
    with pytest.raises(RuntimeError, match="no free KV slot"):
        slots.allocate("c")


def test_random_churn_keeps_rows_dense():
    rng = random.Random(7)
    slots = SlotManager(16)
    live: list[str] = []
    for i in range(2000):
        if live and (not slots.can_allocate() or rng.random() < 0.5):
            slots.free(live.pop(rng.randrange(len(live))))
        else:
            slots.allocate(f"r{i}")
            live.append(f"r{i}")
        slots.check_integrity()
        assert sorted(slots.owners()) == sorted(live)
        assert slots.num_used + slots.num_free == 16
