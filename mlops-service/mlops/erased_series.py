"""Dropping an erased business's labelled series from ``/metrics``, in every worker.

In one process, prometheus_client's ``remove_by_labels`` does it. In
multiprocess mode (gunicorn) it cannot: ``remove()`` only forgets this
process's child, while the value stays in each worker's mmap file
(``counter_<pid>.db`` in ``PROMETHEUS_MULTIPROC_DIR``), which every scrape
merges; prometheus_client warns that removal "has not been implemented in
multi-process mode". So, in that mode:

1. the worker that erases, holding an exclusive ``flock`` on
   ``<dir>/erased-businesses.lock``, appends the business id to
   ``<dir>/erased-businesses`` (one JSON string per line) and sets to 0
   every value of that business's series in every ``.db`` file there, live
   worker's or dead one's (values sit at fixed offsets; prometheus_client
   only ever appends new keys, so writing one value slot is safe beside a
   worker appending);
2. each worker counts (``Telemetry.record_stored``) under a shared lock on
   the same file, first forgetting its children of businesses listed since
   it last looked, so its next increment starts from the 0 in its file, not
   from the value it held in memory;
3. a scrape leaves out the series of a listed business whose merged value
   is 0, i.e. all of them until the business sends new events, which then
   count afresh (a counter reset, as after a restart).

The list lives as long as the directory (gunicorn.conf.py makes a fresh
one per start). Other replicas are not told: their own series of the
business stay until they restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.mmap_dict import MmapedDict

LABEL = "business_id"
_LIST = "erased-businesses"
_LOCK = "erased-businesses.lock"


class ErasedSeries:
    """Forgets the series of erased businesses in ``families`` (those with a
    ``business_id`` label); ``directory`` is ``PROMETHEUS_MULTIPROC_DIR``, or
    None in a single process."""

    def __init__(self, families: Iterable[MetricWrapperBase], directory: Path | None) -> None:
        self._families = [f for f in families if LABEL in f._labelnames]
        self._directory = directory
        self._read_to = 0  # bytes of the list this process has acted on
        self._erased: set[str] = set()
        self._lock = threading.Lock()

    def forget(self, business_id: str) -> None:
        """Drop ``business_id``'s series from ``/metrics`` now, in every worker of this server."""
        if self._directory is None:
            self._forget_here(business_id)
            return
        with self._flock(fcntl.LOCK_EX):
            with open(self._directory / _LIST, "a", encoding="utf-8") as listing:
                listing.write(json.dumps(business_id) + "\n")
            for path in self._directory.glob("*.db"):
                _zero(path, business_id)
            self._catch_up()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Hold while incrementing business series: no erasure zeroes them meanwhile,
        and children of businesses erased since the last call are forgotten first."""
        if self._directory is None:
            yield
            return
        with self._flock(fcntl.LOCK_SH):
            self._catch_up()
            yield

    def visible(self, metrics):
        """``metrics`` (merged families) without the all-zero series of erased businesses."""
        if self._directory is not None:
            self._catch_up()
        for metric in metrics:
            if self._erased:
                metric.samples = [s for s in metric.samples
                                  if not (s.labels.get(LABEL) in self._erased and s.value == 0)]
            yield metric

    def _catch_up(self) -> None:
        """Act on the ids appended to the list since this process last read it."""
        try:
            with open(self._directory / _LIST, "rb") as listing:
                listing.seek(self._read_to)
                added = listing.read()
        except FileNotFoundError:
            return
        added = added[: added.rfind(b"\n") + 1]  # whole lines only
        if not added:
            return
        with self._lock:
            self._read_to += len(added)
            for line in added.splitlines():
                business_id = json.loads(line)
                self._erased.add(business_id)
                self._forget_here(business_id)

    def _forget_here(self, business_id: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not implemented in multi-process"
            for family in self._families:
                family.remove_by_labels({LABEL: business_id})

    @contextlib.contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        fd = os.open(self._directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock


def _zero(path: Path, business_id: str) -> None:
    """Set to 0 every value in mmap file ``path`` whose key carries ``business_id``."""
    values = MmapedDict(str(path))
    try:
        for key, _, _ in values.read_all_values():
            if json.loads(key)[2].get(LABEL) == business_id:
                values.write_value(key, 0.0, 0.0)
    finally:
        values.close()
