"""The one structured selection rule (criteria.structured.select) that channels and heads share."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.criteria.structured import kept_width, select


def test_layer_scope_removes_nearest_count_lowest_first() -> None:
    s = np.array([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 7.0, 8.0, 9.0])
    (rm,) = select([s], 0.25)  # 2.5 -> 3 (halves up)
    assert rm.tolist() == [1, 3, 5]
    (rm,) = select([s], 0.0)
    assert rm.size == 0


def test_round_to_rounds_kept_width_up_and_min_keep_floors_it() -> None:
    assert kept_width(12, 5, round_to=4) == 8  # 7 kept -> 8
    assert kept_width(12, 11, round_to=4) == 4  # never below round_to
    assert kept_width(3, 3, round_to=4) == 1  # width < round_to: no rounding, one unit stays
    assert kept_width(10, 9, min_keep=4) == 4
    (rm,) = select([np.arange(12.0)], 0.4, round_to=4)  # 4.8 -> 5 removed, 7 kept -> 8 kept
    assert rm.tolist() == [0, 1, 2, 3]


def test_global_scope_normalises_per_group_and_honours_min_keep() -> None:
    a = np.array([1.0, 2.0, 3.0, 10.0])  # mean 4
    b = np.array([100.0, 100.0, 100.0, 100.0])  # mean 100: normalised all 1.0
    rm_a, rm_b = select([a, b], 0.25, scope="global")  # total 2: a's 0.25 and 0.5 go first
    assert rm_a.tolist() == [0, 1] and rm_b.size == 0
    rm_a, rm_b = select([a, b], 0.5, scope="global", min_keep=3)  # each group may lose one only
    assert rm_a.tolist() == [0] and rm_b.tolist() == [0]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="scope"):
        select([np.ones(3)], 0.5, scope="row")
    with pytest.raises(ValueError, match="ratio"):
        select([np.ones(3)], 1.5)
