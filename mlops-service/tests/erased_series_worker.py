"""A stand-in gunicorn worker for test_erased_series.py: one process with its own
prometheus_client multiprocess files, driven line by line on stdin.

Commands: ``inc <business> <amount>`` (counted as Telemetry.record_stored does),
``forget <business>``, ``render`` (prints the merged samples as one JSON line).
"""

import json
import os
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector

from mlops.erased_series import ErasedSeries

REQUESTS = Counter("requests", "Requests by business.", ["business_id"])
erased = ErasedSeries([REQUESTS], Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))

for line in sys.stdin:
    command, *args = line.split()
    if command == "inc":
        with erased.counting():
            REQUESTS.labels(args[0]).inc(float(args[1]))
    elif command == "forget":
        erased.forget(args[0])
    elif command == "render":
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        print(json.dumps({s.labels["business_id"]: s.value
                          for m in erased.visible(registry.collect()) for s in m.samples}))
    print("ok", flush=True)
