"""mlops.erased_series across processes, each with its own prometheus_client
multiprocess files (as gunicorn's workers), on one PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


class Worker:
    def __init__(self, directory: Path) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory),
               "PYTHONPATH": str(HERE.parent)}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "erased_series_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def __call__(self, *command) -> str:
        self.proc.stdin.write(" ".join(map(str, command)) + "\n")
        self.proc.stdin.flush()
        lines = []
        while (line := self.proc.stdout.readline().strip()) != "ok":
            assert line, "the worker died"
            lines.append(line)
        return lines[0] if lines else ""

    def render(self) -> dict:
        return json.loads(self("render"))


@pytest.fixture
def workers(tmp_path):
    made = [Worker(tmp_path), Worker(tmp_path), Worker(tmp_path)]
    yield made
    for worker in made:
        worker.proc.stdin.close()
        worker.proc.wait(10)


def test_a_worker_that_never_scraped_counts_an_erased_business_from_zero(workers):
    a, b, scraper = workers
    a("inc", "gone", 5)
    b("inc", "gone", 7)
    a("inc", "stays", 2)
    assert scraper.render() == {"gone": 12.0, "stays": 2.0}

    b("forget", "gone")
    assert scraper.render() == {"stays": 2.0}  # a's file too, though a was not told

    a("inc", "gone", 1)  # a learns of the erasure before counting, not after
    assert scraper.render() == {"gone": 1.0, "stays": 2.0}
    b("inc", "gone", 1)
    assert b.render() == {"gone": 2.0, "stays": 2.0}
