"""The spool file shared by every worker."""

from __future__ import annotations

import multiprocessing

from mlops.spool import Spool

PROCESSES = 16
ROUNDS = 3  # the race showed in about one round of three before the fix


def _open_and_write(directory: str, barrier, index: int) -> None:
    from pathlib import Path

    barrier.wait()  # every process opens the brand-new file at the same moment
    spool = Spool(Path(directory), 1 << 20)
    spool.put([(f"evt-{index}", 0.0, "{}")])
    spool.close()


def test_workers_opening_a_new_spool_at_once_all_succeed(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        directory = tmp_path / str(round_)
        barrier = context.Barrier(PROCESSES)
        procs = [context.Process(target=_open_and_write, args=(str(directory), barrier, i))
                 for i in range(PROCESSES)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=30)
        assert [p.exitcode for p in procs] == [0] * PROCESSES, f"round {round_}"
        spool = Spool(directory, 1 << 20)
        assert sorted(e.event_id for e in spool.peek(100)) == sorted(
            f"evt-{i}" for i in range(PROCESSES))
