"""Learning-rate schedules: pure functions of the 0-based update index, tested at every boundary."""

import math

import pytest

from rankscope.schedules import cosine_with_warmup, jagged_cosine, restart_steps

MAX, WARM, MIN, R, RW = 100, 5, 0.1, 20, 4


def env(step):
    return cosine_with_warmup(step, MAX, WARM, MIN)


def jag(step, offset=0):
    return jagged_cosine(step, MAX, WARM, MIN, R, RW, offset)


def test_cosine_boundaries():
    assert env(0) == pytest.approx(1 / WARM)
    assert env(WARM - 1) == pytest.approx(1.0)  # warm-up ends at full lr
    assert env(WARM) == pytest.approx(1.0)  # cosine starts at 1
    assert env(MAX - 1) == pytest.approx(MIN)  # last update at min_lr_ratio
    assert all(env(s) >= env(s + 1) for s in range(WARM, MAX - 1))


def test_restart_steps():
    # merges after completed steps 20, 40, 60, 80 (and 100, the end: no update follows)
    assert restart_steps(MAX, R) == [20, 40, 60, 80]
    assert restart_steps(MAX, R, offset=10) == [10, 30, 50, 70, 90]


def test_jagged_matches_envelope_before_first_restart():
    for s in range(R):
        assert jag(s) == env(s)  # including the whole global warm-up


@pytest.mark.parametrize("r", [20, 40, 60, 80])
def test_jagged_rewarm_at_each_restart(r):
    # the update right after restart r is 1/RW of the envelope (never 0), then 2/RW, ...
    for i in range(RW):
        assert jag(r + i) == pytest.approx(env(r + i) * (i + 1) / RW)
    assert jag(r + RW) == env(r + RW)  # back on the envelope exactly RW updates later
    assert jag(r - 1) == env(r - 1)  # the step before the restart is untouched
    assert jag(r) < jag(r - 1)  # the jag


def test_jagged_last_step_and_all_positive():
    assert jag(MAX - 1) == pytest.approx(MIN)
    assert all(jag(s) > 0 for s in range(MAX))
    jags = [s for s in range(1, MAX) if jag(s) < jag(s - 1) - 1e-12 and s >= WARM]
    # the only drops larger than the cosine are at the restarts
    big = [s for s in jags if jag(s) < 0.9 * jag(s - 1)]
    assert big == restart_steps(MAX, R)


def test_jagged_with_warm_start_offset():
    off = 10
    assert [jag(s, off) for s in range(off)] == [env(s) for s in range(off)]
    assert jag(off, off) == pytest.approx(env(off) / RW)  # adapters attached: a restart
    assert jag(off + R, off) == pytest.approx(env(off + R) / RW)
    assert jag(R, off) == env(R)  # restarts follow the offset, not multiples of R


def test_jagged_no_rewarm():
    assert all(jagged_cosine(s, MAX, WARM, MIN, R, 0) == env(s) for s in range(MAX))


def test_paper_schedule_numbers():
    # Weiss et al. 2025: 20k steps, reset 2000, 100-step re-warm-up, min-lr ratio 0.1
    f = lambda s: jagged_cosine(s, 20_000, 500, 0.1, 2000, 100)  # noqa: E731
    assert f(1999) == cosine_with_warmup(1999, 20_000, 500, 0.1)
    assert f(2000) == pytest.approx(cosine_with_warmup(2000, 20_000, 500, 0.1) / 100)
    assert f(2099) == pytest.approx(cosine_with_warmup(2099, 20_000, 500, 0.1))
    assert f(19_999) == pytest.approx(0.1)
    assert math.isclose(f(18_000), cosine_with_warmup(18_000, 20_000, 500, 0.1) / 100)
