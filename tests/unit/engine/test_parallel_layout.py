"""How workers split a model: ranks to stages, layers to stages."""

import pytest

from engine.layout import Layout


@pytest.mark.parametrize(("total", "stages"), [(2, 2), (30, 4), (7, 3), (5, 5), (12, 1)])
def test_stages_cover_the_layers_in_order_and_differ_by_at_most_one(total, stages):
    layout = Layout(num_workers=stages * 2, tp_degree=2)
    ranges = [layout.layers(s, total) for s in range(stages)]
    assert [i for r in ranges for i in r] == list(range(total))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra layers go to the first stages


def test_ranks_are_stage_major():
    layout = Layout(num_workers=6, tp_degree=2)
    assert layout.num_stages == 3
    assert [layout.stage(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("workers", "tp"), [(0, 1), (2, 0), (3, 2), (4, 3)])
def test_layouts_that_cannot_be_built_are_refused(workers, tp):
    with pytest.raises(ValueError):
        Layout(workers, tp)
