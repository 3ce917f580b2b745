"""A job's clock in a shared forward: its own body, plus its rows' share of the forward, never
its neighbours' bodies (`cobatch._Clocks`), checked on a hand-driven clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from interlace.errors import swap_warnings
from interlace.execution import cobatch


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(cobatch, "time", fake)
    yield fake
    # Every body entered was left: this thread's warnings are raised again, not collected.
    assert swap_warnings(None) is None


def guards(timeout: float) -> SimpleNamespace:
    return SimpleNamespace(timeout=timeout, deadline=None)


def test_a_job_is_charged_its_rows_share_of_the_forward_and_its_own_body(clock):
    one, three = guards(5.0), guards(5.0)
    clocks = cobatch._Clocks()
    enter_one, enter_three = clocks.enter_fn(one, []), clocks.enter_fn(three, [])
    clocks.start([one, three], [1, 3])
    clock.now += 8.0  # the forward ran 8 s (a big batch) before either body resumed
    enter_one()
    # 8 s of forward, a quarter of it is this job's: 2 s spent, 3 s left.
    assert one.deadline == pytest.approx(clock.now + 3.0)
    clock.now += 1.0  # its body runs 1 s
    clocks.leave()
    enter_three()
    # Its neighbour's second is not its own: three quarters of 8 s charged, -1 s left.
    assert three.deadline == pytest.approx(clock.now - 1.0)
    clocks.leave()


def test_a_neighbour_that_spins_does_not_use_up_a_jobs_time(clock):
    spinner, reader = guards(2.0), guards(2.0)
    clocks = cobatch._Clocks()
    enter_spinner, enter_reader = clocks.enter_fn(spinner, []), clocks.enter_fn(reader, [])
    clocks.start([spinner, reader], [1, 1])
    enter_spinner()
    clock.now += 2.5  # the spinner's body runs past its own limit
    assert clock.now > spinner.deadline  # its guard's next tick stops it
    clocks.leave()
    enter_reader()
    assert reader.deadline == pytest.approx(clock.now + 2.0)  # untouched by the spinner's 2.5 s
    clocks.leave()


def test_warnings_go_to_the_job_whose_body_runs(clock):
    from interlace.errors import warn

    mine: list = []
    job = guards(5.0)
    clocks = cobatch._Clocks()
    enter = clocks.enter_fn(job, mine)
    clocks.start([job], [1])
    enter()
    warn("for this job only")
    clocks.leave()
    assert mine == [(UserWarning, "for this job only")]
