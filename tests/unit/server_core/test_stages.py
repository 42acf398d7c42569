"""The swap's stage clock: nested stages are subtracted from the outer one, one clock per thread."""

from __future__ import annotations

import threading
import time

from server.core.stages import measuring, timed


def test_nested_stages_are_not_counted_twice():
    with measuring() as clock:
        with timed("prepare"):
            time.sleep(0.01)
            with timed("probe"):
                time.sleep(0.03)
        with timed("swap"):
            pass
    assert set(clock.seconds) == {"prepare", "probe", "swap"}
    assert clock.seconds["probe"] >= 0.03 and 0.01 <= clock.seconds["prepare"] < 0.03
    assert abs(clock.total() - sum(clock.seconds.values())) < 1e-9


def test_an_inner_measuring_joins_the_open_clock_and_timed_outside_is_free():
    with timed("registry"):  # no clock: nothing to record, nothing fails
        pass
    with measuring() as outer:
        with timed("registry"):
            pass
        with measuring() as inner, timed("fetch"):
            pass
    assert inner is outer and set(outer.seconds) == {"registry", "fetch"}
    with measuring() as fresh:
        pass
    assert fresh is not outer and fresh.seconds == {}


def test_each_thread_has_its_own_clock():
    seen = {}

    def other() -> None:
        with measuring() as clock, timed("fetch"):
            pass
        seen["other"] = clock

    with measuring() as mine, timed("probe"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert set(mine.seconds) == {"probe"} and set(seen["other"].seconds) == {"fetch"}
