"""The GitHub Actions workflow: audited, schema-valid, and running our own commands.

The lint and test jobs must run what ``make lint`` and the README's test
command run, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def steps(job: str) -> list[dict]:
    workflow = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    return workflow["jobs"][job]["steps"]


def test_zizmor_finds_nothing():
    result = run("zizmor", "--offline", "--no-progress", ".github/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout + result.stderr


def test_every_zizmor_ignore_gives_its_reason():
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            if "zizmor: ignore" in line:
                assert re.search(r"zizmor: ignore\[[a-z-]+\] \S.{10,}", line), line


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_match_the_github_schema(path):
    result = run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dependabot_matches_its_schema():
    result = run("check-jsonschema", "--builtin-schema", "vendor.dependabot",
                 ".github/dependabot.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_third_party_action_is_pinned_to_a_commit_with_its_version():
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            match = re.search(r"uses:\s*(\S+)", line)
            if match and not match.group(1).startswith("./"):
                action = r"[\w.-]+/[\w.-]+(/[\w.-]+)*@[0-9a-f]{40}"  # owner/repo[/path]@sha
                assert re.fullmatch(action, match.group(1)), line
                assert re.search(r"# v\d+\.\d+\.\d+$", line), line


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the tests", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_the_lint_job_runs_make_lint():
    assert [s["run"] for s in steps("lint") if "run" in s] == ["make lint"]


def test_the_test_job_runs_the_readme_command_deselecting_only_container_tests():
    command = readme_test_command()
    assert command == "make test"
    runs = [s["run"] for s in steps("test") if "run" in s and s["run"].startswith("make")]
    assert runs == [f"{command} PYTEST_ARGS='-m \"not container\"'"]


def test_ci_run_uses_the_readme_and_makefile_commands():
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_test_command() in script
    assert "make lint" in script


def test_make_lint_runs_ruff_and_hadolint():
    recipe = subprocess.run(["make", "-n", "lint"], capture_output=True, text=True, cwd=ROOT,
                            check=True).stdout
    assert "ruff check" in recipe and "hadolint" in recipe


def test_only_the_image_job_may_write_packages():
    workflow = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        expected = ({"contents": "read", "packages": "write", "security-events": "write",
                     "actions": "read"} if name == "image" else None)
        assert job.get("permissions") == expected, name


def test_the_audit_job_and_ci_run_audit_the_pinned_requirements():
    assert [s["run"] for s in steps("audit") if "run" in s] == ["make audit"]
    assert "make audit" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_image_has_provenance_and_an_sbom_and_is_scanned():
    image = steps("image")
    pushed = next(s for s in image if s.get("name", "").startswith("Build"))
    assert pushed["with"]["provenance"] == "mode=max"
    assert pushed["with"]["sbom"] is True
    trivy = [s for s in image if s.get("uses", "").startswith("aquasecurity/trivy-action@")]
    report, gate = trivy
    assert report["with"]["format"] == "sarif" and report["with"]["exit-code"] == "0"
    upload = next(s for s in image if "upload-sarif@" in s.get("uses", ""))
    assert upload["with"]["sarif_file"] == report["with"]["output"]
    # The build fails on fixable findings only.
    assert gate["with"]["exit-code"] == "1" and gate["with"]["ignore-unfixed"] is True
