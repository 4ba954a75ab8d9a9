"""A stop request cuts only work that may be redone; elsewhere it waits for the next check."""

import os
import signal

import pytest

from models.training.stopping import StopSwitch


def test_a_request_outside_interruptible_work_waits_for_the_check():
    stop = StopSwitch()
    stop.request()
    assert stop.asked
    with pytest.raises(KeyboardInterrupt):
        stop.check()


def test_a_request_during_interruptible_work_stops_it_at_once():
    stop = StopSwitch()
    done = []
    with pytest.raises(KeyboardInterrupt):
        with stop.interruptible():
            stop.request()
            done.append("after the request")
    assert done == [] and stop.asked


def test_interruptible_work_does_not_start_once_a_stop_is_asked():
    stop = StopSwitch()
    stop.request()
    started = []
    with pytest.raises(KeyboardInterrupt):
        with stop.interruptible():
            started.append(True)
    assert started == []


def test_no_check_raises_until_a_stop_is_asked():
    stop = StopSwitch()
    with stop.interruptible():
        stop.check()
    stop.check()
    assert not stop.asked


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_become_requests(signum):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        between_steps, mid_step = StopSwitch(), StopSwitch()
        between_steps.handle_signals()
        os.kill(os.getpid(), signum)
        assert between_steps.asked
        mid_step.handle_signals()
        after = []
        with pytest.raises(KeyboardInterrupt):
            with mid_step.interruptible():
                os.kill(os.getpid(), signum)
                after.append(True)
        assert after == [] and mid_step.asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
