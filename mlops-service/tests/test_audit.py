"""Supply chain: ``make audit``'s verdicts, the hashed locks, the pinned base image.

``verdict`` is fed pip-audit's own ``--format json`` output. unreachable.json
is a real capture from this repository's CI machine, which reaches PyPI's
package index but not its JSON API (``pip-audit -r <flask==0.12.2,
jinja2==2.10> --no-deps --format json``; pip-audit itself exited 0 and said
"No known vulnerabilities found"). That machine cannot produce a finding, so
the vulnerable and clean reports are written here in the format pip-audit
2.10's ``pip_audit/_format/json.py`` emits, with the real advisories of
those two old releases.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from servers import SERVICE_DIR

ROOT = SERVICE_DIR.parent
_spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
audit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audit)

UNREACHABLE = json.loads((Path(__file__).parent / "pip_audit" / "unreachable.json").read_text())
VULNERABLE = {
    "dependencies": [
        {"name": "flask", "version": "0.12.2", "vulns": [
            {"id": "PYSEC-2018-66", "fix_versions": ["0.12.3"]}]},
        {"name": "jinja2", "version": "2.10", "vulns": [
            {"id": "PYSEC-2019-217", "fix_versions": ["2.10.1"]}]},
        {"name": "blinker", "version": "1.9.0", "vulns": []},
    ],
    "fixes": [],
}
CLEAN = {"dependencies": [{"name": "flask", "version": "3.1.3", "vulns": []},
                          {"name": "jinja2", "version": "3.1.6", "vulns": []}],
         "fixes": []}
LOCKS = {name: SERVICE_DIR / f"{name}.txt"
         for name in ("requirements", "requirements-embedded", "requirements-dev")}
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)", re.M)


def pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of the ``name==version`` lines of a requirements file."""
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for name, version in PIN.findall(path.read_text())}


def test_a_report_where_nothing_could_be_looked_up_is_not_a_pass():
    status, lines = audit.verdict(UNREACHABLE)
    assert status == audit.COULD_NOT_CHECK != 0
    assert lines[-1].startswith("pip-audit: COULD NOT CHECK: none of the 2 packages")


def test_a_known_vulnerability_fails_and_names_its_fix():
    status, lines = audit.verdict(VULNERABLE)
    assert status == 1
    assert lines == ["flask 0.12.2: PYSEC-2018-66 (fixed in: 0.12.3)",
                     "jinja2 2.10: PYSEC-2019-217 (fixed in: 2.10.1)",
                     "pip-audit: 2 of 3 packages have known vulnerabilities"]


def test_a_partial_check_fails():
    report = {"dependencies": CLEAN["dependencies"] + UNREACHABLE["dependencies"][:1]}
    status, lines = audit.verdict(report)
    assert status == 1 and lines[-1] == "pip-audit: 1 of 3 packages could not be checked"


def test_every_package_checked_and_clean_passes():
    assert audit.verdict(CLEAN) == (
        0, ["pip-audit: 2 packages checked, no known vulnerabilities"])


@pytest.mark.parametrize(("report", "allowed", "status"), [
    (UNREACHABLE, None, audit.COULD_NOT_CHECK), (UNREACHABLE, "1", 0),
    (VULNERABLE, "1", 1), (CLEAN, None, 0)])
def test_only_the_could_not_check_outcome_is_accepted_on_request(monkeypatch, capsys, report,
                                                                allowed, status):
    monkeypatch.setattr(audit, "run", lambda: (report, ""))
    if allowed is None:
        monkeypatch.delenv("AUDIT_ALLOW_UNCHECKED", raising=False)
    else:
        monkeypatch.setenv("AUDIT_ALLOW_UNCHECKED", allowed)
    assert audit.main() == status
    assert ("accepted here" in capsys.readouterr().out) == (allowed == "1" and
                                                            report is UNREACHABLE)


def test_pip_audit_is_asked_about_every_pinned_package_of_the_locks():
    """A real pip-audit run: its report names each package the three locks pin.

    Skipped only where pip-audit cannot reach PyPI at all (.ci/offline-check's
    namespace): it then fails without a report, and `make audit` with it.
    """
    report, error = audit.run()
    if report is None and "ConnectionError" in error:
        pytest.skip("pip-audit cannot reach PyPI from here")
    assert report is not None, error
    pinned = set().union(*(pins(path) for path in LOCKS.values()))
    assert {dep["name"] for dep in report["dependencies"]} == pinned


def test_github_actions_audits_strictly_and_only_ci_run_accepts_could_not_check():
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "AUDIT_ALLOW_UNCHECKED" not in workflow
    job = yaml.safe_load(workflow)["jobs"]["audit"]
    assert [s["run"] for s in job["steps"] if "run" in s] == ["make audit"]
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    assert run[run.index("make audit") - 1] == "export AUDIT_ALLOW_UNCHECKED=1"


def test_each_lock_pins_its_inputs_with_hashes():
    """requirements*.txt were compiled from the current requirements*.in (`make lock`)."""
    for name, lock in LOCKS.items():
        text = lock.read_text()
        assert f"--output-file={name}.txt" in text and "--generate-hashes" in text
        locked = pins(lock)
        wanted = pins(SERVICE_DIR / f"{name}.in")
        assert {n: locked.get(n) for n in wanted} == wanted, f"{name}.txt is stale: make lock"
        # Every pin is followed by its hashes (pip's --require-hashes refuses less).
        blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.split("\n", 6)[-1])
        assert all("--hash=sha256:" in block for block in blocks if PIN.match(block))


def test_the_locks_agree_and_the_dev_lock_holds_everything_make_install_needs():
    runtime, embedded, dev = (pins(LOCKS[name]) for name in LOCKS)
    assert {n: embedded[n] for n in embedded.keys() & runtime.keys()} == {
        n: runtime[n] for n in embedded.keys() & runtime.keys()}
    assert {n: dev.get(n) for n in runtime | embedded} == runtime | embedded


def test_the_image_installs_the_lock_by_hash_on_a_base_pinned_by_digest():
    dockerfile = (SERVICE_DIR / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert froms and all(re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", f) for f in froms)
    assert re.search(r"pip install .*--require-hashes --no-deps -r requirements\.txt", dockerfile)
