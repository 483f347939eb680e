"""Progress: the ETA on a synthetic clock, and plain lines on a terminal of unknown size."""

from __future__ import annotations

import io
import os
import select

import pytest

from rankscope.core.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_costs(total: int, start_up: float, step: float, every: int, extra: float):
    """Cost of each step: the first carries the start-up, every `every`-th a checkpoint / evaluation."""
    return [step + (start_up if i == 0 else 0.0) + (extra if (i + 1) % every == 0 else 0.0) for i in range(total)]


@pytest.mark.parametrize("start_up, every, extra", [(30.0, 30, 0.5), (120.0, 100, 3.0), (0.0, 10, 1.0)])
def test_eta_within_30_percent_after_a_tenth_of_the_run(start_up, every, extra):
    total, clock = 300, Clock()
    costs = run_costs(total, start_up, 1.0, every, extra)
    bar = Progress(total, "train", stream=io.StringIO(), tty=False, clock=clock)
    for i, cost in enumerate(costs):
        clock.now += cost
        bar.update(1)
        done = i + 1
        if total // 10 <= done <= total * 9 // 10:  # past 90% the time left is a few steps: one checkpoint is +-50%
            truth = sum(costs[done:])
            assert abs(bar.eta() - truth) <= 0.3 * truth, (done, bar.eta(), truth)


def test_eta_of_a_resumed_run_counts_only_its_own_steps():
    clock = Clock()
    bar = Progress(100, "train", initial=50, stream=io.StringIO(), tty=False, clock=clock)
    clock.now += 40.0  # start-up of the resumed process, carried by its first step
    bar.update(1)
    for _ in range(9):
        clock.now += 2.0
        bar.update(1)
    assert bar.eta() == pytest.approx(40 * 2.0)


def test_a_terminal_of_unknown_size_gets_plain_lines():
    """`script` from a non-terminal gives a pty of 0 columns: no bar (it may never draw), the plain lines instead."""
    main, sub = os.openpty()
    try:
        stream = os.fdopen(sub, "w")
        assert stream.isatty() and os.get_terminal_size(sub).columns == 0
        bar = Progress(20, "train", stream=stream)
        assert bar.bar is None
        for _ in range(20):
            bar.update(1)
        bar.close()
        stream.flush()
        out = b""
        while select.select([main], [], [], 0.5)[0]:
            out += os.read(main, 65536)
        out = out.decode()
        assert out.count("[train]") == 10 and "\r" not in out.replace("\r\n", "\n")
    finally:
        os.close(main)
        stream.close()
