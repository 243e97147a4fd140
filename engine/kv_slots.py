"""Torch-free bookkeeping of the KV-cache slots.

The cache holds `num_slots` rows; the running batch always occupies rows [0, n) with no
holes, so a decode iteration reads one contiguous prefix of the cache and never gathers.
When a query finishes (early termination) its row is refilled by the last running row:

    before free(b):   [a b c d | . . .]      n = 4
    after:            [a d c | . . . .]      n = 3, move (src=3 -> dst=1)

The move is returned to the caller, which must copy that row's keys and values before the
next step reads the cache (the paper's KV compaction, one row per finished query).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlotMove:
    src: int
    dst: int


class SlotManager:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._owners: list[str] = []  # row i is owned by _owners[i]
        self._slot_of: dict[str, int] = {}

    @property
    def num_used(self) -> int:
        return len(self._owners)

    @property
    def num_free(self) -> int:
        return self.num_slots - len(self._owners)

    def can_allocate(self, count: int = 1) -> bool:
        return count <= self.num_free

    def allocate(self, owner: str) -> int:
        if owner in self._slot_of:
            raise ValueError(f"{owner!r} already holds slot {self._slot_of[owner]}")
        if not self.can_allocate():
            raise RuntimeError("no free KV slot")
        slot = len(self._owners)
        self._owners.append(owner)
        self._slot_of[owner] = slot
        return slot

    def free(self, owner: str) -> SlotMove | None:
        """Release `owner`'s row; returns the compaction move to apply, if any."""
        slot = self._slot_of.pop(owner)
        last = len(self._owners) - 1
        tail_owner = self._owners.pop()
        if slot == last:
            return None
        self._owners[slot] = tail_owner
        self._slot_of[tail_owner] = slot
        return SlotMove(src=last, dst=slot)

    def holds(self, owner: str) -> bool:
        return owner in self._slot_of

    def slot_of(self, owner: str) -> int:
        return self._slot_of[owner]

    def owners(self) -> list[str]:
        """Owners in row order: row i belongs to owners()[i]."""
        return list(self._owners)

    def check_integrity(self) -> None:
        """Raise AssertionError if the two views of the slot table disagree."""
        assert len(self._owners) <= self.num_slots, "more owners than slots"
        assert len(set(self._owners)) == len(self._owners), "an owner holds two rows"
        assert len(self._slot_of) == len(self._owners), "index and rows differ in size"
        for row, owner in enumerate(self._owners):
            assert self._slot_of.get(owner) == row, f"{owner!r} indexed at the wrong row"
