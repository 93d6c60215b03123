"""Progress lines off a terminal: when they appear and what they say (a fake clock: one second per step)."""
import logging

import pytest

from engine.core import progress
from engine.core.progress import Monitor


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def run_stage(monitor, clock, name, steps, first=0):
    with monitor.stage(name, first, steps):
        for step in range(first + 1, steps + 1):
            clock[0] += 1.0
            monitor.step(step, {500: {"loss": 2.0 + step / 100}, 900: {"loss": 3.0}}, 1e-4, 0.5)


def test_a_line_every_n_steps_with_the_stage_and_run_eta(clock, caplog):
    monitor = Monitor(log_every=4, tokens_per_step=100, terminal=False)
    monitor.plan_stages({"sandwich": 1000.0, "student": 3000.0})  # training FLOPs: the student costs 3x the sandwich
    with caplog.at_level(logging.INFO, logger="engine.core.progress"):
        run_stage(monitor, clock, "sandwich", 10)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" | ")[0] for line in lines] == ["sandwich 1/10 (10%)", "sandwich 4/10 (40%)",
                                                        "sandwich 8/10 (80%)", "sandwich 10/10 (100%)"]
    # at step 4: 4 s in, 6 s left in the stage; the student's FLOPs at the sandwich's speed (10 s per 1000) = 30 s
    assert lines[1].split(" | ")[1:] == ["loss s=0.5 2.0400 s=0.9 3.0000", "lr 1.00e-04 grad 0.5", "100 tok/s",
                                         "stage 0m04s, ETA 0m06s", "run 0m04s, ETA ~0m36s"]


def test_about_once_a_minute_by_default_and_a_resumed_stage_counts_from_its_checkpoint(clock, caplog):
    monitor = Monitor(tokens_per_step=100, terminal=False)
    with caplog.at_level(logging.INFO, logger="engine.core.progress"):
        run_stage(monitor, clock, "student", 200, first=50)
    steps = [r.getMessage().split(" | ")[0] for r in caplog.records]
    assert steps == ["student 51/200 (26%)", "student 111/200 (56%)", "student 171/200 (86%)",
                     "student 200/200 (100%)"]
    assert "stage 0m01s, ETA 2m29s" in caplog.records[0].getMessage()  # 150 steps left at 1 s each
    assert "run" in caplog.records[0].getMessage() and "~" not in caplog.records[0].getMessage()  # no plan, no ETA


def test_other_ranks_and_terminals_print_no_lines(clock, caplog):
    with caplog.at_level(logging.INFO, logger="engine.core.progress"):
        run_stage(Monitor(log_every=1, terminal=False, enabled=False), clock, "sandwich", 3)
        run_stage(Monitor(log_every=1, terminal=True), clock, "sandwich", 3)
    assert not caplog.records


def test_plain_iterations_log_about_once_a_minute_off_a_terminal(clock, caplog):
    def ticking(n):
        for i in range(n):
            clock[0] += 20.0
            yield i

    with caplog.at_level(logging.INFO, logger="engine.core.progress"):
        assert list(progress.progress(ticking(10), "importance", total=10)) == list(range(10))
    assert [r.getMessage() for r in caplog.records] == ["importance 3/10 | 1m00s, ETA 2m20s",
                                                        "importance 6/10 | 2m00s, ETA 1m20s",
                                                        "importance 9/10 | 3m00s, ETA 0m20s"]
