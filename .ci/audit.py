"""``make audit``: pip-audit over the hashed locks; one line of verdict.

Audits every package the locks pin, transitive dependencies included:
mlops-service/requirements.txt (what the image installs),
requirements-embedded.txt and requirements-dev.txt (what ``make install``
installs), against PyPI's vulnerability data (pip-audit's default service).
``--require-hashes`` makes pip-audit read the pins as they are: it resolves
nothing and installs nothing.

Exit status (``verdict`` decides it from pip-audit's JSON report):

* 0: every package was checked and none has a known vulnerability;
* 1: a package has a known vulnerability (each is listed with its fix), or
  some packages were checked and others could not be, or pip-audit failed;
* 3 (``COULD_NOT_CHECK``): not one package could be looked up, so nothing was
  judged. pip-audit itself exits 0 then ("No known vulnerabilities found"):
  a machine that reaches PyPI's package index but not its JSON API (this
  repository's own CI machine) gets a skip reason for every package.

With ``AUDIT_ALLOW_UNCHECKED=1`` in the environment the could-not-check
outcome, and only it, exits 0 after saying so; .ci/run sets it on its
registry-only machine. GitHub Actions' audit job does not: there it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ["mlops-service/requirements.txt", "mlops-service/requirements-embedded.txt",
         "mlops-service/requirements-dev.txt"]
COULD_NOT_CHECK = 3


def run(locks: list[str] = LOCKS) -> tuple[dict | None, str]:
    """Run pip-audit on ``locks`` (paths relative to the repository root).

    Returns (its JSON report, "") or, when it printed no report, (None, the
    tail of its stderr with its exit status).
    """
    pip_audit = Path(sys.executable).with_name("pip-audit")
    command = [str(pip_audit), "--format", "json", "--progress-spinner", "off",
               "--require-hashes", "--disable-pip"]
    for path in locks:
        command += ["--requirement", path]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    try:
        return json.loads(result.stdout), ""
    except json.JSONDecodeError:
        return None, f"exit {result.returncode}:\n{result.stderr[-3000:]}"


def verdict(report: dict) -> tuple[int, list[str]]:
    """The exit status and the lines to print for pip-audit's JSON ``report``.

    ``report`` is pip-audit's ``--format json`` output: {"dependencies": [...]}
    where a checked package is {"name", "version", "vulns": [{"id",
    "fix_versions", ...}]} and one that could not be looked up is {"name",
    "skip_reason"}. The last line is the one-line summary.
    """
    dependencies = report["dependencies"]
    vulnerable = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if "skip_reason" in d]
    lines = []
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
            lines.append(f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})")
    if vulnerable:
        lines.append(f"pip-audit: {len(vulnerable)} of {len(dependencies)} packages have known "
                     "vulnerabilities")
        return 1, lines
    if len(skipped) == len(dependencies):
        reason = f" ({skipped[0]['skip_reason']})" if skipped else ""
        lines.append(f"pip-audit: COULD NOT CHECK: none of the {len(dependencies)} packages "
                     f"could be looked up{reason}; no vulnerability data was reached, so "
                     "nothing was judged")
        return COULD_NOT_CHECK, lines
    if skipped:
        lines += [f"{dep['name']}: {dep['skip_reason']}" for dep in skipped]
        lines.append(f"pip-audit: {len(skipped)} of {len(dependencies)} packages could not be "
                     "checked")
        return 1, lines
    lines.append(f"pip-audit: {len(dependencies)} packages checked, no known vulnerabilities")
    return 0, lines


def main() -> int:
    report, error = run()
    if report is None:
        print(f"pip-audit failed ({error})")
        return 1
    status, lines = verdict(report)
    print("\n".join(lines))
    if status == COULD_NOT_CHECK and os.environ.get("AUDIT_ALLOW_UNCHECKED") == "1":
        print("audit: the could-not-check outcome is accepted here (AUDIT_ALLOW_UNCHECKED=1, "
              "set by .ci/run); GitHub Actions' audit job fails on it")
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
