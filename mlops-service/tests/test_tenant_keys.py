"""Keys limited to businesses and keys that expire (``MLOPS_KEYS_FILE``), on real gunicorn.

A key limited to business A writes, reads and erases A; for B it gets the
403 of an unknown key, per item in a batch, whether B exists or not; it
lists only A; it gets nothing that names every business (``/metrics``,
``GET /erasures``, other keys in ``/health/detailed``). An expired key is
refused and logged. The unlimited keys of ``MLOPS_API_KEY`` and
``MLOPS_READ_API_KEY`` keep every right (tests/test_auth.py). The dashboard,
opened in Chromium with a key limited to two businesses, offers only those
two and shows a refusal, not data, for a third.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from conftest import metric_sum, metric_values, query
from payloads import SUCCESS, varied
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select
from test_dashboard import (  # the browser, and how the dashboard's tests read the page
    analytics,
    assert_clean_console,
    assert_page_matches,
    browser,  # noqa: F401 (fixture)
    loaded,
    open_page,
    page,  # noqa: F401 (fixture)
    screenshot,
    track,
    wait,
    wait_refreshed_after,
)

from mlops.auth import FORBIDDEN_MESSAGE, get_auth
from mlops.config import ConfigError, Settings

FULL = "tenant-full-key-8c1e2f40aa"
READ = "tenant-read-key-5b7d9e13cc"
A_KEY = "tenant-a-only-key-1f2e3d4c"
SPLIT = "tenant-split-key-77e0a1b2c3"
EXPIRED = "tenant-expired-key-0a9b8c7d"
WRONG = "tenant-wrong-key-000000000"
SECRETS = (FULL, READ, A_KEY, SPLIT, EXPIRED, WRONG)
A, B = "biz-a", "biz-b"

KEYS_FILE = f"""
# Business A's own app: writes, reads and erases A only.
[[key]]
name = "biz-a-app"
key = "{A_KEY}"
scopes = ["write", "read", "erase"]
businesses = ["{A}"]

# A partner writing A's events and reading A's and B's figures.
[[key]]
name = "partner"
key_file = "split.key"
scopes = ["write", "read"]
businesses = {{ write = ["{A}"], read = ["{A}", "{B}"] }}

[[key]]
name = "retired"
key = "{EXPIRED}"
scopes = ["write", "read", "erase"]
expires_at = 2020-01-01T00:00:00Z
"""


def keys_file(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "split.key").write_text(f"{SPLIT}\n")
    path = tmp_path / "keys.toml"
    path.write_text(KEYS_FILE + extra)
    return path


def event(business: str, tag: str) -> dict:
    return {**SUCCESS, "business_id": business, "conversation_id": f"conv-{tag}",
            "session_id": f"sess-{tag}"}


class Client:
    """requests against one server, with one key."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url, self.headers = url, ({"X-API-Key": key} if key else {})

    def __getattr__(self, method):
        return lambda path, **kw: requests.request(method, self.url + path,
                                                   headers=self.headers, timeout=10, **kw)


def stored(pg, business: str) -> int:
    return query(pg, "SELECT count(*) FROM mlops_events WHERE business_id = %s", business)[0][0]


def refused_like_an_unknown_key(response, unknown) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == {**unknown.json()} and response.json()["message"] == \
        FORBIDDEN_MESSAGE
    assert response.content == unknown.content


def failures(url: str, **labels) -> float:
    text = requests.get(f"{url}/metrics", headers={"X-API-Key": READ}, timeout=10).text
    return metric_sum(metric_values(text), "mlops_auth_failures_total", **labels)


def test_a_key_limited_to_a_writes_reads_lists_and_erases_a_only(gunicorn, pg, tmp_path):
    server = gunicorn(workers=2, MLOPS_API_KEY=FULL, MLOPS_READ_API_KEY=READ,
                      MLOPS_KEYS_FILE=keys_file(tmp_path))
    full, a_key, wrong = (Client(server.url, k) for k in (FULL, A_KEY, WRONG))
    before = {s: failures(server.url, scope=s, reason="business_not_allowed")
              for s in ("write", "read", "erase")}

    # The unlimited key writes both businesses, as before.
    for tag, business in (("b1", B), ("b2", B), ("b3", B)):
        assert full.post("/track", json=event(business, tag)).status_code == 201
    # Writes: A stored, B refused with the unknown key's 403, nothing stored.
    assert a_key.post("/track", json=event(A, "a1")).status_code == 201
    refused_like_an_unknown_key(a_key.post("/track", json=event(B, "x1")),
                                wrong.post("/track", json=event(A, "x2")))
    assert (stored(pg, A), stored(pg, B)) == (1, 3)
    # A batch: the item for B refused in its result, the others stored.
    batch = a_key.post("/track/batch", json=[event(A, "a2"), event(B, "x3"), event(A, "a3"),
                                             {"business_id": A}])
    assert batch.status_code == 207
    body = batch.json()
    assert [r["status"] for r in body["results"]] == [201, 403, 201, 422]
    assert body["results"][1]["error"] == [{"field": "business_id",
                                            "problem": FORBIDDEN_MESSAGE}]
    assert (body["status"], body["accepted"], body["rejected"]) == ("partial", 2, 2)
    assert (stored(pg, A), stored(pg, B)) == (3, 3)

    # Reads: A's analytics; B's refused exactly as a business that does not exist.
    analytics = a_key.get(f"/analytics/{A}")
    assert analytics.status_code == 200 and analytics.json()["metrics"]["total_messages"] == 3
    missing = a_key.get("/analytics/biz-never-seen")
    refused_like_an_unknown_key(a_key.get(f"/analytics/{B}"), missing)
    refused_like_an_unknown_key(missing, wrong.get(f"/analytics/{A}"))
    assert full.get(f"/analytics/{B}").json()["metrics"]["total_messages"] == 3
    listed = [b["business_id"] for b in a_key.get("/businesses").json()["businesses"]]
    assert listed == [A]
    assert [b["business_id"] for b in full.get("/businesses").json()["businesses"]] == [A, B]

    # Nothing that names every business.
    assert a_key.get("/metrics").status_code == 401
    refused_like_an_unknown_key(a_key.get("/erasures"), wrong.get("/erasures"))

    # Erasure: A's conversation goes; B's, and one that does not exist, are refused alike.
    gone = a_key.delete("/conversations/conv-a1")
    assert gone.status_code == 200 and gone.json()["removed"]["mlops_events"] == 1
    no_such = a_key.delete("/conversations/conv-never-seen")
    refused_like_an_unknown_key(a_key.delete("/conversations/conv-b1"), no_such)
    refused_like_an_unknown_key(no_such, wrong.delete("/conversations/conv-b1"))
    refused_like_an_unknown_key(a_key.delete("/sessions/sess-b2"),
                                a_key.delete("/sessions/sess-never-seen"))
    assert a_key.delete("/sessions/sess-a2").json()["removed"]["mlops_events"] == 1
    refused_like_an_unknown_key(a_key.delete(f"/businesses/{B}"),
                                wrong.delete(f"/businesses/{B}"))
    assert (stored(pg, A), stored(pg, B)) == (1, 3)
    assert a_key.delete(f"/businesses/{A}").json()["removed"]["mlops_events"] == 1
    assert (stored(pg, A), stored(pg, B)) == (0, 3)
    # The refusals are in the audit trail, under the key's id, like any refused erasure.
    trail = full.get("/erasures?limit=20").json()["erasures"]
    refused = {(r["target_id"], r["outcome"]) for r in trail}
    assert {("conv-b1", "refused"), (B, "refused"), ("conv-a1", "erased"),
            (A, "erased")} <= refused

    counted = {s: failures(server.url, scope=s, reason="business_not_allowed") - before[s]
               for s in before}
    # write: /track and one batch item; read: B and a missing business; erase: two
    # conversations, two sessions, a business, /erasures.
    assert counted == {"write": 2, "read": 2, "erase": 6}
    log = server.log() + "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "request refused: the key does not reach this business" in log
    assert not any(secret in log for secret in SECRETS)


def test_per_scope_lists_and_a_key_file(gunicorn, pg, tmp_path):
    """The partner key writes A only and reads A and B; a bearer key is the same key."""
    server = gunicorn(workers=2, MLOPS_API_KEY=FULL, MLOPS_KEYS_FILE=keys_file(tmp_path))
    full = Client(server.url, FULL)
    partner = Client(server.url, None)
    partner.headers = {"Authorization": f"Bearer {SPLIT}"}
    assert full.post("/track", json=event(B, "b1")).status_code == 201
    assert partner.post("/track", json=event(A, "a1")).status_code == 201
    assert partner.post("/track", json=event(B, "x1")).status_code == 403
    assert partner.get(f"/analytics/{B}").status_code == 200
    assert partner.get("/analytics/biz-c").status_code == 403
    assert sorted(b["business_id"] for b in partner.get("/businesses").json()["businesses"]) \
        == [A, B]
    assert partner.delete("/conversations/conv-a1").status_code == 403  # no erase scope
    assert (stored(pg, A), stored(pg, B)) == (1, 1)


def test_an_expired_key_is_refused_and_the_log_says_why(gunicorn, pg, tmp_path):
    # Far enough ahead for gunicorn to start and serve a request on a loaded machine.
    soon = (datetime.now(UTC) + timedelta(seconds=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    expiring = "tenant-expiring-key-4d4d4d4d"
    path = keys_file(tmp_path, f'\n[[key]]\nname = "expiring"\nkey = "{expiring}"\n'
                               f'scopes = ["write"]\nexpires_at = {soon}\n')
    server = gunicorn(workers=1, MLOPS_API_KEY=FULL, MLOPS_READ_API_KEY=READ,
                      MLOPS_KEYS_FILE=path, LOG_LEVEL="INFO")
    expired, wrong = Client(server.url, EXPIRED), Client(server.url, WRONG)
    before = failures(server.url, scope="write", reason="expired_key")

    refused_like_an_unknown_key(expired.post("/track", json=event(A, "e1")),
                                wrong.post("/track", json=event(A, "e2")))
    refused_like_an_unknown_key(expired.get(f"/analytics/{A}"), wrong.get(f"/analytics/{A}"))
    assert expired.get("/metrics").status_code == 401

    # A key working until its expiry, refused from then on, without a restart.
    assert Client(server.url, expiring).post("/track", json=event(A, "s1")).status_code == 201
    # Time passes on purpose: to just past the key's expires_at.
    time.sleep(max(0.0, (datetime.fromisoformat(soon) - datetime.now(UTC)).total_seconds())
               + 0.2)
    assert Client(server.url, expiring).post("/track", json=event(A, "s2")).status_code == 403
    assert stored(pg, A) == 1
    assert failures(server.url, scope="write", reason="expired_key") - before == 2

    lines = [json.loads(line) for line in
             (tmp_path / "logs" / "mlops-service.log").read_text().splitlines()]
    expiries = [r for r in lines if r["message"] == "request refused: the API key has expired"]
    assert {(r["key_name"], r["expired_at"]) for r in expiries} == {
        ("retired", "2020-01-01T00:00:00+00:00"), ("expiring", datetime.fromisoformat(
            soon).isoformat())}
    assert all(len(r["key_id"]) == 12 for r in expiries)
    text = (tmp_path / "logs" / "mlops-service.log").read_text() + server.log()
    assert not any(secret in text for secret in (*SECRETS, expiring))


def test_health_detailed_lists_each_key_without_the_key(make_app, tmp_path):
    app = make_app(MLOPS_API_KEY=FULL, MLOPS_READ_API_KEY=READ,
                   MLOPS_KEYS_FILE=keys_file(tmp_path))
    client = app.test_client()
    response = client.get("/health/detailed", headers={"X-API-Key": READ})
    keys = response.get_json()["keys"]
    assert not any(secret in response.get_data(as_text=True) for secret in SECRETS)
    ids = {}
    with app.test_request_context():
        for key in (FULL, READ, A_KEY, SPLIT, EXPIRED):
            ids[key] = get_auth(app).keyring.key_id(key)
    assert [k["key_id"] for k in keys] == [ids[k] for k in (FULL, READ, A_KEY, SPLIT, EXPIRED)]
    by_id = {k["key_id"]: k for k in keys}
    assert by_id[ids[FULL]] == {
        "key_id": ids[FULL], "source": "MLOPS_API_KEY", "name": None,
        "scopes": ["write", "read", "erase"],
        "businesses": {"write": None, "read": None, "erase": None},
        "expires_at": None, "expired": False}
    assert by_id[ids[SPLIT]]["businesses"] == {"write": [A], "read": [A, B]}
    assert by_id[ids[SPLIT]]["source"] == "MLOPS_KEYS_FILE"
    assert by_id[ids[EXPIRED]]["expires_at"] == "2020-01-01T00:00:00+00:00"
    assert by_id[ids[EXPIRED]]["expired"] is True
    # A limited key sees its own entry only: the others would name other businesses.
    own = client.get("/health/detailed", headers={"X-API-Key": A_KEY}).get_json()["keys"]
    assert [k["key_id"] for k in own] == [ids[A_KEY]]
    # Without a read key, no listing at all.
    assert "keys" not in client.get("/health/detailed").get_json()
    assert "keys" not in client.get("/health/detailed",
                                    headers={"X-API-Key": EXPIRED}).get_json()


def test_warn_mode_relaxes_missing_keys_not_business_limits(make_app, pg, tmp_path):
    client = make_app(MLOPS_API_KEY=FULL, MLOPS_KEYS_FILE=keys_file(tmp_path),
                      MLOPS_AUTH_MODE="warn").test_client()
    assert client.post("/track", json=event(B, "w1")).status_code == 201  # no key: stored
    assert client.post("/track", json=event(B, "w2"),
                       headers={"X-API-Key": A_KEY}).status_code == 403
    assert (stored(pg, A), stored(pg, B)) == (0, 1)


def test_a_keys_file_alone_turns_auth_on(make_app, pg, tmp_path):
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db",
                                  "MLOPS_KEYS_FILE": str(keys_file(tmp_path))})
    assert settings.auth_mode == "enforce" and settings.api_keys == ()
    assert A_KEY not in repr(settings)
    client = make_app(MLOPS_KEYS_FILE=keys_file(tmp_path)).test_client()
    assert client.post("/track", json=event(A, "k1")).status_code == 401
    assert client.post("/track", json=event(A, "k2"),
                       headers={"X-API-Key": A_KEY}).status_code == 201
    assert client.get("/health/detailed").get_json()["auth"] == "api_key"


GOOD = f'key = "{A_KEY}"\nscopes = ["read"]\n'


@pytest.mark.parametrize(("entry", "message"), [
    ('key = "short-key"\nscopes = ["read"]',
     r"^MLOPS_KEYS_FILE key 2: the key must be at least 16 characters \(it has 9\)$"),
    (f'name = "ops"\nkey = "{WRONG}"\nscopes = ["raed"]',
     r"^MLOPS_KEYS_FILE key 2 \(ops\): scopes\.0: Input should be 'write', 'read' or 'erase'$"),
    (f'key = "{WRONG}"\nscopes = ["read"]\nexpires_at = 2027-01-01T00:00:00',
     r"^MLOPS_KEYS_FILE key 2: expires_at: Input should have timezone info$"),
    (f'key = "{WRONG}"\nscopes = ["read", "write"]\nbusinesses = {{ read = ["a"] }}',
     r"^MLOPS_KEYS_FILE key 2: businesses names no list for scope 'write'"),
    (f'key = "{WRONG}"\nscopes = ["read"]\nbusinesses = []',
     r"^MLOPS_KEYS_FILE key 2: businesses: List should have at least 1 item"),
    (f'key = "{WRONG}"\nscopes = ["read"]\nbusiness = ["a"]',
     r"^MLOPS_KEYS_FILE key 2: business: Extra inputs are not permitted$"),
    ('key_file = "missing.key"\nscopes = ["read"]',
     r"^MLOPS_KEYS_FILE key 2: key_file 'missing.key' cannot be read"),
    (f'key = "{WRONG}"\nkey_file = "x"\nscopes = ["read"]',
     r"^MLOPS_KEYS_FILE key 2: give key or key_file \(one of them\)$"),
    (GOOD, r"^MLOPS_KEYS_FILE key 2: the key is given again"),
    (f'key = "{FULL}"\nscopes = ["read"]', r"also in MLOPS_API_KEY"),
    (f'key = "{WRONG}"\nscopes = ["read"\n', r"^MLOPS_KEYS_FILE is not valid TOML"),
])
def test_a_malformed_entry_stops_the_start_with_one_line_naming_it(tmp_path, entry, message):
    path = tmp_path / "keys.toml"
    path.write_text(f"[[key]]\n{GOOD}\n[[key]]\n{entry}\n")
    with pytest.raises(ConfigError, match=message) as refused:
        Settings.from_env({"DATABASE_URL": "postgresql://u@h/db", "MLOPS_API_KEY": FULL,
                           "MLOPS_KEYS_FILE": str(path)})
    text = str(refused.value)
    assert "\n" not in text and not any(secret in text for secret in SECRETS)


@pytest.mark.parametrize(("content", "message"), [
    (None, "MLOPS_KEYS_FILE cannot be read"),
    ("", "MLOPS_KEYS_FILE holds no \\[\\[key\\]\\] table"),
    ("[keys]\nkey = 1\n", "MLOPS_KEYS_FILE has 'keys' at the top level"),
    (b"\xff\xfe", "MLOPS_KEYS_FILE is not UTF-8 text"),
])
def test_an_unreadable_keys_file_stops_the_start(tmp_path, content, message):
    path = tmp_path / "keys.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"DATABASE_URL": "postgresql://u@h/db",
                           "MLOPS_KEYS_FILE": str(path)})


def test_gunicorn_does_not_start_with_a_malformed_keys_file(gunicorn, tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f'[[key]]\nname = "x"\nkey = "{A_KEY}"\nscopes = []\n')
    with pytest.raises(RuntimeError) as failed:
        gunicorn(workers=1, MLOPS_KEYS_FILE=path)
    assert "MLOPS_KEYS_FILE key 1 (x): scopes: List should have at least 1 item" \
        in str(failed.value)
    assert A_KEY not in str(failed.value)


@pytest.mark.browser
def test_the_dashboard_with_a_key_limited_to_two_businesses(gunicorn, page, tmp_path):  # noqa: F811
    tag = uuid.uuid4().hex[:6]
    mine, also_mine, other = f"dash-a-{tag}", f"dash-b-{tag}", f"dash-c-{tag}"
    two = "tenant-dashboard-key-" + uuid.uuid4().hex
    path = tmp_path / "keys.toml"
    path.write_text(f'[[key]]\nname = "two-businesses"\nkey = "{two}"\nscopes = ["read"]\n'
                    f'businesses = ["{mine}", "{also_mine}"]\n')
    server = gunicorn(workers=2, MLOPS_API_KEY=FULL, MLOPS_KEYS_FILE=path)
    # The third business is the busiest: the page must not open it by default.
    for business, n in ((mine, 4), (also_mine, 2), (other, 9)):
        track(server.url, varied(n, [business]), key=FULL)

    open_page(page, server.url + "/")
    assert page.find_element(By.ID, "key-form").get_attribute("data-reason") == "missing"
    before = loaded(page)
    page.find_element(By.ID, "api-key").send_keys(two + Keys.ENTER)
    wait_refreshed_after(page, before)
    wait(page, lambda d: d.find_element(By.ID, "main").is_displayed())
    picker = Select(page.find_element(By.ID, "business"))
    assert [o.get_attribute("value") for o in picker.options] == [mine, also_mine]
    assert_page_matches(page, analytics(server.url, mine, 30, key=two))

    # A hand-edited URL for the third business: the refusal, no figures, the key kept.
    open_page(page, f"{server.url}/?business_id={other}")
    refused = page.find_element(By.ID, "refused")
    wait(page, lambda d: refused.is_displayed(), message="no refusal shown")
    assert page.find_element(By.ID, "refused-business").text == other
    assert not page.find_element(By.ID, "main").is_displayed()
    assert not page.find_element(By.ID, "key-form").is_displayed()
    assert page.find_element(By.ID, "business-name").text != other
    picker = Select(page.find_element(By.ID, "business"))
    assert [o.get_attribute("value") for o in picker.options] == ["", mine, also_mine]
    assert picker.first_selected_option.get_attribute("value") == ""
    assert page.execute_script("return sessionStorage.length") == 1
    assert other not in page.find_element(By.TAG_NAME, "body").text.replace(
        page.find_element(By.ID, "refused").text, "")
    screenshot(page, "business-refused", 1366, 900)

    # Choosing one of its businesses shows that business's figures.
    before = loaded(page)
    picker.select_by_value(also_mine)
    wait_refreshed_after(page, before)
    wait(page, lambda d: d.find_element(By.ID, "main").is_displayed())
    assert not refused.is_displayed()
    assert_page_matches(page, analytics(server.url, also_mine, 30, key=two))
    page.execute_script("sessionStorage.clear()")
    assert_clean_console(page, allow_statuses=(401, 403))


def test_the_keys_file_example_in_the_docs_is_accepted(tmp_path):
    security = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    example = re.search(r"^```toml\n(.*?)^```$", security, re.M | re.S).group(1)
    for number, name in enumerate(re.findall(r'key_file = "([^"]+)"', example)):
        (tmp_path / Path(name).name).write_text(f"example-key-{number}-0123456789\n")
        example = example.replace(f'"{name}"', f'"{Path(name).name}"')
    path = tmp_path / "keys.toml"
    path.write_text(example)
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db",
                                  "MLOPS_KEYS_FILE": str(path)})
    grants = {spec.grant.name: spec.grant for spec in settings.scoped_keys}
    assert grants["acme-dashboard"].limited_to("read") == {"acme"}
    assert grants["partner-app"].limited_to("read") == {"partner-1", "partner-2"}
    assert grants["partner-app"].limited_to("write") == {"partner-1"}


def test_the_erasure_audit_names_a_bearer_key(make_app, tmp_path):
    app = make_app(MLOPS_API_KEY=FULL, MLOPS_KEYS_FILE=keys_file(tmp_path))
    client = app.test_client()
    tag = uuid.uuid4().hex[:8]
    assert client.post("/track", json=event(A, tag),
                       headers={"X-API-Key": A_KEY}).status_code == 201
    bearer = {"Authorization": f"Bearer {A_KEY}"}
    assert client.delete(f"/conversations/conv-{tag}", headers=bearer).status_code == 200
    assert client.delete(f"/conversations/other-{tag}", headers=bearer).status_code == 403
    trail = client.get("/erasures", headers={"X-API-Key": FULL}).get_json()["erasures"]
    with app.app_context():
        expected = get_auth(app).keyring.key_id(A_KEY)
    assert [(r["target_id"], r["outcome"], r["key_id"]) for r in trail
            if tag in r["target_id"]] == [(f"other-{tag}", "refused", expected),
                                          (f"conv-{tag}", "erased", expected)]
