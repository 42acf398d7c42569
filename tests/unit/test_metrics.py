import pytest

from fmlora.errors import DataError
from fmlora.training import AccuracyMatrix


def test_metrics_on_a_known_matrix():
    m = AccuracyMatrix()
    m.add_row([0.9], [10])
    m.add_row([0.7, 0.8], [10, 30])
    m.add_row([0.6, 0.8, 1.0], [10, 30, 20])
    assert m.seen_accuracy(0) == pytest.approx(0.9)
    assert m.seen_accuracy(1) == pytest.approx((7 + 24) / 40)
    assert m.final_accuracy() == pytest.approx((6 + 24 + 20) / 60)
    assert m.average_incremental_accuracy() == pytest.approx((0.9 + 31 / 40 + 50 / 60) / 3)
    # task 0: best 0.9 -> 0.6; task 1: best 0.8 -> 0.8
    assert m.forgetting() == pytest.approx((0.3 + 0.0) / 2)
    assert m.summary()["accuracy_matrix"][2] == [0.6, 0.8, 1.0]


def test_single_task_has_no_forgetting_and_rows_must_grow_by_one():
    m = AccuracyMatrix()
    m.add_row([0.5], [4])
    assert m.forgetting() == 0.0
    with pytest.raises(DataError):
        m.add_row([0.5], [4])
