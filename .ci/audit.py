"""``make audit``: pip-audit over the pinned requirements; one line of verdict.

Runs pip-audit (PyPI's vulnerability data, the default service) on
mlops-service/requirements.txt and requirements-dev.txt, resolved as pip
would install them, and exits:

* 1 if any package has a known vulnerability (each is listed with its fix);
* 1 if some packages were checked but others could not be (a strict audit);
* 0, saying so, if not one package could be looked up: the machine reaches
  the package index but not the vulnerability data (this repository's own CI
  machine is such a one), so there is nothing to judge; GitHub Actions'
  audit job runs the same command with full access;
* 0 when every package was checked and none is vulnerable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ["mlops-service/requirements.txt", "mlops-service/requirements-dev.txt"]


def main() -> int:
    pip_audit = Path(sys.executable).with_name("pip-audit")
    command = [str(pip_audit), "--format", "json", "--progress-spinner", "off"]
    for path in REQUIREMENTS:
        command += ["--requirement", path]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        print(f"pip-audit failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        return 1
    dependencies = report["dependencies"]
    vulnerable = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if "skip_reason" in d]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
            print(f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})")
    if vulnerable:
        print(f"pip-audit: {len(vulnerable)} of {len(dependencies)} packages have known "
              "vulnerabilities")
        return 1
    if skipped and len(skipped) == len(dependencies):
        print(f"pip-audit: could look up none of the {len(dependencies)} packages "
              f"({skipped[0]['skip_reason']}); the vulnerability data is unreachable from "
              "this machine, so nothing was judged here")
        return 0
    if skipped:
        for dep in skipped:
            print(f"{dep['name']}: {dep['skip_reason']}")
        print(f"pip-audit: {len(skipped)} of {len(dependencies)} packages could not be checked")
        return 1
    print(f"pip-audit: {len(dependencies)} packages checked, no known vulnerabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
