"""Background threads (mlops/background.py): real threads, stopped, woken and joined."""

from __future__ import annotations

import threading
import time

import pytest
from support import holds_for, wait_until

from mlops.background import Loop, start_thread


class Passes:
    """A step counting its passes, resting in ``rest(loop)`` after each."""

    def __init__(self, rest) -> None:
        self.count = 0
        self.loop: Loop | None = None
        self._rest = rest

    def __call__(self) -> None:
        self.count += 1
        self._rest(self.loop)


def make(name: str, rest) -> tuple[Loop, Passes]:
    passes = Passes(rest)
    passes.loop = Loop(name, passes)
    return passes.loop, passes


def threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_start_runs_one_named_daemon_thread_however_often_it_is_called():
    loop, passes = make("test-loop-once", lambda loop: loop.wait(60))
    results: list[bool] = []
    callers = [threading.Thread(target=lambda: results.append(loop.start())) for _ in range(8)]
    try:
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(5)
        assert sorted(results) == [False] * 7 + [True]
        (thread,) = threads_named("test-loop-once")
        assert thread.daemon
        wait_until(lambda: passes.count == 1, "the first pass")
        assert loop.start() is False
    finally:
        assert loop.stop(join_seconds=5)
    assert threads_named("test-loop-once") == [] and passes.count == 1


@pytest.mark.parametrize("rest", [Loop.wait, Loop.idle], ids=["wait", "idle"])
def test_stop_ends_a_wait_at_once_and_joins_the_thread(rest):
    loop, passes = make("test-loop-stop", lambda loop: rest(loop, 60))
    loop.start()
    wait_until(lambda: passes.count == 1, "the first pass")
    assert not loop.stopping
    started = time.monotonic()
    assert loop.stop(join_seconds=30) is True  # the thread ended
    assert time.monotonic() - started < 2, "stop waited for the 60 s rest"
    assert loop.stopping and threads_named("test-loop-stop") == []


def test_stop_gives_up_joining_after_its_timeout():
    release = threading.Event()
    loop, _ = make("test-loop-busy", lambda loop: release.wait(60))  # a pass that ignores stop
    loop.start()
    try:
        started = time.monotonic()
        assert loop.stop(join_seconds=0.1) is False
        assert time.monotonic() - started < 2
        assert threads_named("test-loop-busy")
    finally:
        release.set()
    wait_until(lambda: not threads_named("test-loop-busy"), "the thread to end after its pass")


def test_stop_before_start_and_a_loop_never_started():
    loop, passes = make("test-loop-unstarted", lambda loop: loop.wait(60))
    assert loop.stop(join_seconds=1) is True and loop.stopping
    assert loop.wait(60) is True and loop.idle(60) is True  # at once: stop was asked
    loop.start()
    wait_until(lambda: not threads_named("test-loop-unstarted"), "the thread to end")
    assert passes.count == 0


def test_wake_ends_an_idle_early_but_not_a_wait():
    idle, idled = make("test-loop-idle", lambda loop: loop.idle(60))
    idle.start()
    waiting, waited = make("test-loop-wait", lambda loop: loop.wait(60))
    waiting.start()
    try:
        wait_until(lambda: idled.count == 1 and waited.count == 1, "the first passes")
        idle.wake()
        waiting.wake()
        wait_until(lambda: idled.count == 2, "a second pass after the wake-up")
        holds_for(lambda: waited.count == 1, "wait() ignoring wake()", seconds=0.3)
        holds_for(lambda: idled.count == 2, "the wake-up consumed by one idle", seconds=0.3)
    finally:
        assert idle.stop(join_seconds=5) and waiting.stop(join_seconds=5)


def test_a_wake_given_between_idles_ends_the_next_idle_at_once():
    loop = Loop("test-loop-unused", lambda: None)  # never started: idle() is called here
    loop.wake()
    started = time.monotonic()
    assert loop.idle(60) is False
    assert time.monotonic() - started < 2


def test_a_step_stopping_its_own_loop_makes_its_pass_the_last():
    stopped: list[bool] = []

    def rest(loop: Loop) -> None:
        if passes.count == 3:
            stopped.append(loop.stop(join_seconds=5))
    loop, passes = make("test-loop-self-stop", rest)
    loop.start()
    wait_until(lambda: not threads_named("test-loop-self-stop"), "the thread to end")
    assert passes.count == 3 and loop.stopping
    assert stopped == [False]  # from its own thread: no join


def test_an_error_a_step_lets_out_ends_the_thread_and_is_reported():
    errors: list[BaseException] = []
    reported = threading.Event()
    previous = threading.excepthook

    def hook(args) -> None:
        errors.append(args.exc_value)
        reported.set()

    def crash(loop: Loop) -> None:
        raise ValueError("a bug in the step")

    loop, passes = make("test-loop-crash", crash)
    threading.excepthook = hook
    try:
        loop.start()
        assert reported.wait(5), "the step's error did not reach threading.excepthook"
    finally:
        threading.excepthook = previous
    wait_until(lambda: not threads_named("test-loop-crash"), "the thread to end")
    assert passes.count == 1 and isinstance(errors[0], ValueError)


def test_start_thread_calls_the_function_once_in_a_named_daemon_thread():
    seen: list[threading.Thread] = []
    thread = start_thread("test-one-shot", lambda: seen.append(threading.current_thread()))
    thread.join(5)
    assert not thread.is_alive() and seen == [thread]
    assert thread.name == "test-one-shot" and thread.daemon
