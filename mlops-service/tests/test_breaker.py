"""The circuit breaker (mlops/breaker.py): open on a failure, one probe thread closes it."""

from __future__ import annotations

import threading

import pytest

from mlops.breaker import Breaker


class Probe:
    """A probe that fails until ``healthy`` is set, counting its calls; on success it
    closes the breaker, as Database.ping does through Database.run."""

    def __init__(self) -> None:
        self.healthy = threading.Event()
        self.calls = 0
        self.called = threading.Semaphore(0)
        self.breaker: Breaker | None = None

    def __call__(self) -> None:
        self.calls += 1
        self.called.release()
        if not self.healthy.is_set():
            raise ConnectionError("still down")
        self.breaker.close()


@pytest.fixture
def probe():
    p = Probe()
    yield p
    if p.breaker is not None:
        p.breaker.stop()


def make(probe: Probe, interval: float = 0.01) -> Breaker:
    probe.breaker = Breaker(probe, interval, expected=(ConnectionError,), thread_name="test-probe")
    return probe.breaker


def wait_probe_ends(breaker: Breaker, seconds: float = 5.0) -> None:
    ended = threading.Event()

    def watch() -> None:
        while breaker.probing:
            ended.wait(0.005)
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    assert ended.wait(seconds), "the probe thread did not end"


def test_a_new_breaker_is_closed_and_probes_nothing(probe):
    breaker = make(probe)
    assert not breaker.is_open and not breaker.probing and probe.calls == 0


def test_a_trip_opens_it_once_and_the_probe_closes_it_when_a_call_succeeds(probe):
    breaker = make(probe)
    assert breaker.trip() is True  # it was closed: the caller logs the outage once
    assert breaker.trip() is False  # already open
    assert breaker.is_open and breaker.probing
    for _ in range(3):  # failing probes are ignored; the probing goes on
        assert probe.called.acquire(timeout=5)
    assert breaker.is_open
    probe.healthy.set()
    wait_probe_ends(breaker)
    assert not breaker.is_open


def test_a_second_outage_starts_a_new_probe(probe):
    breaker = make(probe)
    probe.healthy.set()
    for _ in range(2):
        assert breaker.trip() is True
        wait_probe_ends(breaker)
        assert not breaker.is_open


def test_a_call_succeeding_elsewhere_closes_it_and_ends_the_probe(probe):
    breaker = make(probe)
    breaker.trip()
    assert probe.called.acquire(timeout=5)
    breaker.close()  # a request's own call succeeded
    wait_probe_ends(breaker)
    assert not breaker.is_open


def test_an_unexpected_error_in_the_probe_is_not_swallowed(probe):
    def crash() -> None:
        raise ValueError("a bug in the probe")

    breaker = Breaker(crash, 0.01, expected=(ConnectionError,))
    errors: list[BaseException] = []
    crashed = threading.Event()
    previous = threading.excepthook

    def hook(args) -> None:
        errors.append(args.exc_value)
        crashed.set()

    threading.excepthook = hook
    try:
        breaker.trip()
        assert crashed.wait(5), "the probe's error was not raised in its thread"
    finally:
        threading.excepthook = previous
    assert isinstance(errors[0], ValueError)


def test_stop_ends_the_probing_for_good(probe):
    breaker = make(probe)
    breaker.trip()
    breaker.stop()
    wait_probe_ends(breaker)
    assert breaker.is_open  # nothing closed it: no probe runs any more
    calls = probe.calls
    breaker.close()
    assert breaker.trip() is True and not breaker.probing and probe.calls == calls
