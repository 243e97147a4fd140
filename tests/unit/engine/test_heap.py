"""A process's start-up heap: frozen once built, with the collector back on either way."""

import gc

import pytest

from engine.heap import startup_phase


def test_startup_phase_freezes_what_it_built_and_turns_the_collector_back_on() -> None:
    before = gc.get_freeze_count()
    try:
        with startup_phase():
            assert not gc.isenabled()
            built = [[i] for i in range(1000)]  # tracked objects, alive after start-up
        assert gc.isenabled()
        assert gc.get_freeze_count() >= before + len(built)
        with pytest.raises(RuntimeError), startup_phase():
            raise RuntimeError("the model failed to load")
        assert gc.isenabled()
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
