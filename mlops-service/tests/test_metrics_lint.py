"""/metrics as Prometheus sees it passes ``promtool check metrics``."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import requests
from payloads import FAILURE, SUCCESS


@pytest.fixture(scope="module")
def promtool() -> str:
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not path or not os.path.exists(path):
        pytest.fail("promtool not found: run `make tools` (or set PROMTOOL=/path/to/promtool)")
    return path


def test_promtool_finds_nothing_to_report(gunicorn, promtool):
    server = gunicorn(workers=2)
    for payload in (SUCCESS, FAILURE, {**SUCCESS, "appointment_booked": True}):
        assert requests.post(f"{server.url}/track", json=payload, timeout=5).status_code == 201
    requests.post(f"{server.url}/track", data="junk", timeout=5)
    requests.post(f"{server.url}/refresh-metrics", json={"trigger": "new_metrics"}, timeout=5)
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
