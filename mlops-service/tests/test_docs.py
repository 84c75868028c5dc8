"""README.md and docs/*.md say what is true: their examples run, their links lead somewhere.

* Every ``curl`` line in a fenced shell block of README.md or docs/*.md is run
  verbatim by bash against a real gunicorn (the ``gunicorn`` fixture). The
  pages address the service as ``localhost:5001``, as a reader runs it; the
  test server listens on a free port instead (5001 may be taken on a shared
  machine), and a curl config file given through ``CURL_HOME`` maps the one
  onto the other with ``--connect-to``, so the line itself is not rewritten.
  Each line must answer 2xx, or the status its trailing comment names
  (``# 401: no key``).
* Lines that carry ``X-API-Key`` or a bearer token, or that show a refusal
  (401, 403), run against a service started with the example credentials
  that docs/security.md shows; the others against an open service, as the
  pages say they work. Either way the contract's example message is tracked
  first, so an example that reads, erases or analyses it finds it.
* Every relative link (file, and heading when it has ``#anchor``) resolves;
  README.md stays at most 150 lines and links every page under docs/; the
  make targets table in docs/development.md names every documented target;
  its Layout names every module of the service.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import requests
from payloads import SUCCESS

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS_ADDRESS = "localhost:5001"  # where the pages' examples send their requests
EXAMPLE_KEY = "change-me-to-a-long-random-key"
EXAMPLE_TOKEN = "change-me-to-a-long-random-token"
README_MAX_LINES = 150

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL_FENCES = {"bash", "sh", "shell", "console"}
# A trailing comment naming the status the line shows: `curl ...  # 401: no key`.
EXPECTED_STATUS = re.compile(r"\s#\s*([1-5]\d\d)\b[^'\"]*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def shell_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of each line in the page's shell fences, ``\\`` lines joined."""
    text = page.read_text()
    found = []
    for fence in FENCE.finditer(text):
        if fence.group(1) not in SHELL_FENCES:
            continue
        first = text.count("\n", 0, fence.start(2)) + 1
        pending, start = "", first
        for number, line in enumerate(fence.group(2).splitlines(), first):
            if not pending:
                start = number
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            found.append((start, (pending + line).strip()))
            pending = ""
    return found


def curl_lines(page: Path) -> list[tuple[int, str]]:
    return [(number, line) for number, line in shell_lines(page) if line.startswith("curl ")]


def run_curl_line(line: str, port: int, tmp_path: Path) -> list[int]:
    """Run ``line`` verbatim in bash, ``localhost:5001`` reaching ``port``: the statuses seen."""
    (tmp_path / ".curlrc").write_text(
        f'connect-to = "{DOCS_ADDRESS}:127.0.0.1:{port}"\n'
        'noproxy = "*"\n'
        "max-time = 30\n"
        "silent\n"
        "show-error\n"
        'write-out = "%{stderr}mlops-docs-status %{http_code}\\n"\n')
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "CURL_HOME": str(tmp_path)})
    assert done.returncode == 0, f"curl exited {done.returncode}: {done.stderr}"
    statuses = [int(s) for s in re.findall(r"^mlops-docs-status (\d{3})$", done.stderr, re.M)]
    assert statuses, f"no status: .curlrc unread, no request, or the line sets -w: {done.stderr}"
    return statuses


@pytest.mark.parametrize("page", [p for p in PAGES if curl_lines(p)], ids=rel)
def test_every_curl_line_works_as_written(page, gunicorn, tmp_path):
    """Each page's lines in order, as a reader runs them: one server per set of credentials."""
    servers = {}

    def server(keyed: bool):
        if keyed not in servers:
            credentials = {"MLOPS_API_KEY": EXAMPLE_KEY, "MLOPS_METRICS_TOKEN": EXAMPLE_TOKEN}
            servers[keyed] = gunicorn(workers=2, **(credentials if keyed else {}))
            headers = {"X-API-Key": EXAMPLE_KEY} if keyed else {}
            tracked = requests.post(servers[keyed].url + "/track", json=SUCCESS,
                                    headers=headers, timeout=10)
            assert tracked.status_code in (201, 202), tracked.text  # stored, or spooled
        return servers[keyed]

    failures = []
    for number, line in curl_lines(page):
        where = f"{rel(page)}:{number}"
        assert DOCS_ADDRESS in line, f"{where} does not address {DOCS_ADDRESS}: {line}"
        expected = EXPECTED_STATUS.search(line)
        keyed = ("X-API-Key" in line or "Authorization: Bearer" in line
                 or (expected is not None and expected.group(1) in ("401", "403")))
        statuses = run_curl_line(line, server(keyed).port, tmp_path)
        wanted = [int(expected.group(1))] if expected else range(200, 300)
        if any(status not in wanted for status in statuses):
            want = expected.group(1) if expected else "2xx"
            failures.append(f"{where}: answered {statuses}, not {want}: {line[:120]}")
    assert not failures, "\n".join(failures)


def test_the_docs_show_the_example_credentials_the_keyed_examples_use():
    security = (ROOT / "docs" / "security.md").read_text()
    assert f"MLOPS_API_KEY={EXAMPLE_KEY} MLOPS_METRICS_TOKEN={EXAMPLE_TOKEN} make run" in security


def test_the_pages_have_curl_examples_to_run():
    assert sum(len(curl_lines(page)) for page in PAGES) >= 15


def without_code(text: str) -> str:
    """``text`` with fenced blocks and inline code spans blanked (their brackets are not links)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", "``", text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids in ``page``: lower case, punctuation dropped, spaces to hyphens,
    ``-1``, ``-2`` … for repeats."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        ids.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return ids


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(without_code(page.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not (linked.is_relative_to(ROOT) and linked.exists()):
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {rel(linked)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_the_readme_is_short_and_links_every_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(readme)}
    assert set((ROOT / "docs").glob("*.md")) <= linked


def test_the_make_targets_table_names_every_documented_target():
    targets = re.findall(r"^([a-z-]+):[^\n]*##", (ROOT / "Makefile").read_text(), re.M)
    page = (ROOT / "docs" / "development.md").read_text()
    assert targets and [t for t in targets if f"| `make {t}` |" not in page] == []


def test_the_layout_names_every_module_of_the_service():
    """docs/development.md's Layout lists each module of mlops/ and mlops/store/ by file
    name, so the tree a newcomer reads is the tree there is."""
    page = (ROOT / "docs" / "development.md").read_text()
    layout = page[page.index("## Layout"):]
    service = ROOT / "mlops-service" / "mlops"
    modules = [p.name for p in (*service.glob("*.py"), *(service / "store").glob("*.py"))]
    assert len(modules) > 40
    assert [m for m in modules if not re.search(rf"^\s+{re.escape(m)} ", layout, re.M)] == []
