"""The dashboard at ``/`` in a real headless Chromium, against real gunicorn and Postgres.

One browser for the module and one gunicorn per configuration (open, empty
database, with a key, on a private cluster that the outage test stops),
started when first needed. Every browser test
ends by reading Chromium's console: any error fails it, a Content Security
Policy violation included (``test_console_check_catches_a_csp_violation``
shows that check can fail). Screenshots go to ``screenshots/`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from conftest import ADMIN_URL, admin, empty_tables, with_dbname
from payloads import SUCCESS, varied
from pgcluster import PgCluster
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from servers import SERVICE_DIR, Gunicorn

pytestmark = pytest.mark.browser

# Debian's packages; another Chromium/chromedriver pair can be named in the environment.
CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--lang=en-US",
)
SCREENSHOTS = SERVICE_DIR / "screenshots"
KEY = "dashboard-test-key-" + uuid.uuid4().hex
# Chromium logs every non-2xx fetch as a console error; the error-state tests
# expect exactly these, and nothing else.
FAILED_FETCH = re.compile(r"Failed to load resource: the server responded with a status of "
                          r"(\d{3})")


# ---- Servers and browser (module-wide: they are expensive and left as found).

@pytest.fixture(scope="module")
def service_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("dashboard")


def _server(database_url: str, folder: Path, **env) -> Gunicorn:
    base = {"DATABASE_URL": database_url, "LOG_DIR": str(folder / "logs"),
            "SPOOL_DIR": str(folder / "spool"), "LOG_LEVEL": "WARNING"}
    return Gunicorn({**base, **env}, workers=2).start()


@pytest.fixture(scope="module")
def server(database_url, service_dirs):
    """gunicorn on the test database, no key: the page and its data are open."""
    empty_tables(database_url)
    srv = _server(database_url, service_dirs / "open")
    yield srv
    srv.stop()
    empty_tables(database_url)


@pytest.fixture(scope="module")
def empty_server(service_dirs):
    """gunicorn on a database of its own that nothing is ever tracked into."""
    name = f"mlops_test_empty_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE DATABASE "{name}"')
    srv = _server(with_dbname(ADMIN_URL, name), service_dirs / "empty")  # migrates at start
    yield srv
    srv.stop()
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def keyed_server(database_url, service_dirs):
    """gunicorn with ``MLOPS_API_KEY`` set: /businesses and /analytics need the key."""
    srv = _server(database_url, service_dirs / "keyed", MLOPS_API_KEY=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def outage(service_dirs):
    """A private Postgres cluster and a gunicorn on it; the test stops and restarts it."""
    cluster = PgCluster()
    cluster.start()
    srv = _server(cluster.url(), service_dirs / "outage")
    yield cluster, srv
    srv.stop()
    cluster.destroy()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Debian Chromium for the module, driven through chromedriver."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: "
                    "apt-get install -y chromium chromium-driver (make system-deps does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1366,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser):
    """The browser on a blank tab with an empty sessionStorage; console checked after.

    Afterwards the browser closes its idle connections, so that a server stopped
    after the test does not wait on them (see ``close_idle_connections``).
    """
    browser.get("about:blank")
    browser.get_log("browser")  # drop what earlier tests left
    yield browser
    close_idle_connections(browser)


def close_idle_connections(driver) -> None:
    """Close the browser's idle kept-alive connections, with chrome://net-internals' button.

    A gevent worker stopping gracefully waits on an idle kept-alive connection until
    gunicorn's ``keepalive`` (5 s) runs out; Chromium keeps its connections for minutes.
    """
    driver.get("chrome://net-internals/#sockets")
    driver.find_element(By.ID, "sockets-view-close-idle-button").click()


# ---- Helpers.

def console(driver) -> list[dict]:
    """Console entries since the last call (chromedriver hands each out once)."""
    return driver.get_log("browser")


def console_problems(entries: list[dict], allow_statuses: tuple[int, ...] = ()) -> list[str]:
    """The entries that are errors: CSP reports, and failed fetches not in ``allow_statuses``."""
    bad = []
    for entry in entries:
        message = entry["message"]
        failed = FAILED_FETCH.search(message)
        if "Content Security Policy" in message:
            bad.append(message)
        elif failed and int(failed.group(1)) in allow_statuses:
            continue
        elif entry["level"] == "SEVERE":
            bad.append(message)
    return bad


def assert_clean_console(driver, allow_statuses: tuple[int, ...] = ()) -> None:
    """No console error since the last check (see :func:`console_problems`)."""
    bad = console_problems(console(driver), allow_statuses)
    assert not bad, "console errors:\n" + "\n".join(bad)


def wait(driver, condition, timeout: float = 15, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        condition, message=message)


def loaded(driver) -> int:
    """The number of the last refresh the page finished (0 before the first)."""
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") or 0)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: loaded(d) > 0, message="page never finished a refresh")


def wait_refreshed_after(driver, before: int) -> None:
    wait(driver, lambda d: loaded(d) > before, message="page did not refresh")


SET_HIDDEN = ("Object.defineProperty(document, 'hidden', {value: arguments[0], "
              "configurable: true});document.dispatchEvent(new Event('visibilitychange'));")


def refresh_now(driver) -> None:
    """Hide and show the tab (the page refreshes on coming back); wait for that refresh."""
    before = loaded(driver)
    driver.execute_script(SET_HIDDEN, True)
    driver.execute_script(SET_HIDDEN, False)
    wait_refreshed_after(driver, before)


def track(base: str, events: list[dict], key: str | None = None) -> None:
    headers = {"X-API-Key": key} if key else {}
    with requests.Session() as session:
        for event in events:
            response = session.post(f"{base}/track", json=event, headers=headers, timeout=10)
            assert response.status_code == 201, response.text


def analytics(base: str, business: str, days: int, key: str | None = None) -> dict:
    headers = {"X-API-Key": key} if key else {}
    response = requests.get(f"{base}/analytics/{business}", params={"days": days},
                            headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def shown_metrics(driver) -> dict[str, float]:
    """``{metric key: exact value}`` of every figure on the page (from data-value/title)."""
    values = {}
    for element in driver.find_elements(By.CSS_SELECTOR, "[data-metric]"):
        title = element.get_attribute("title")
        assert title, f"{element.get_attribute('data-metric')} has no exact value in its title"
        values[element.get_attribute("data-metric")] = float(title.split()[0])
    return values


def assert_page_matches(driver, body: dict) -> None:
    """The page's figures are /analytics' figures, for the same business."""
    assert driver.find_element(By.ID, "business-name").text == body["business_id"]
    shown = shown_metrics(driver)
    for key, value in shown.items():
        assert value == pytest.approx(float(body["metrics"][key]), rel=1e-12), key
    models = [[c.text for c in row.find_elements(By.CSS_SELECTOR, "th, td")]
              for row in driver.find_elements(By.CSS_SELECTOR, "#model-table tbody tr")]
    expected = sorted(body["by_model"], key=lambda m: -m["messages"])
    assert [m[0] for m in models] == [m["model_name"] for m in expected]
    assert [int(m[1].replace(",", "")) for m in models] == [m["messages"] for m in expected]


def screenshot(driver, name: str, width: int, height: int) -> Path:
    """A viewport screenshot at ``width``×``height`` CSS pixels, under screenshots/."""
    SCREENSHOTS.mkdir(exist_ok=True)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    try:
        # the charts follow the new width (resize is debounced by 100 ms)
        wait(driver, lambda d: d.execute_script(
            "const c = document.querySelector('#chart-messages');"
            "const u = c && c.querySelector('.uplot');"
            "return !u || Math.abs(u.offsetWidth - c.clientWidth) < 2"))
        path = SCREENSHOTS / f"{name}-{width}x{height}.png"
        assert driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


# ---- The page's headers (no browser needed).

def test_page_and_assets_carry_security_headers(server):
    for path in ("/", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        response = requests.get(server.url + path, timeout=10)
        assert response.status_code == 200, path
        csp = response.headers["Content-Security-Policy"]
        directives = dict((d.split(" ", 1) + [""])[:2] for d in csp.split("; "))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert not re.search(r"https?:|\*|data:", csp), "CSP allows another origin"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    page = requests.get(server.url + "/", timeout=10).text
    assert "<script>" not in page and not re.search(r"<script(?![^>]*\bsrc=)", page)
    assert not re.search(r"\bon[a-z]+=|\bstyle=", page), "inline handler or style in the page"
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page loads another origin"


# ---- GET /businesses (the picker's data; no browser needed).

def test_businesses_lists_each_business_busiest_first_with_its_totals(server, businesses):
    response = requests.get(server.url + "/businesses", params={"days": 7}, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["days"] == 7
    listed = [b for b in body["businesses"] if b["business_id"] in businesses]
    assert [b["business_id"] for b in listed] == businesses
    messages = [b["messages"] for b in body["businesses"]]
    assert messages == sorted(messages, reverse=True)
    for row in listed:
        metrics = analytics(server.url, row["business_id"], 7)["metrics"]
        assert row["messages"] == metrics["total_messages"]
        assert row["tokens"] == metrics["total_tokens"]
        assert row["api_cost_usd"] == pytest.approx(metrics["total_api_cost_usd"], rel=1e-9)
        assert row["success_rate"] == pytest.approx(metrics["success_rate"], rel=1e-9)


@pytest.mark.parametrize("days", ["0", "3651", "week", "1.5"])
def test_businesses_rejects_a_bad_window_naming_the_field(server, days):
    response = requests.get(server.url + "/businesses", params={"days": days}, timeout=10)
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["days"]


def test_businesses_needs_the_key_when_one_is_set(keyed_server):
    url = keyed_server.url + "/businesses"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"X-API-Key": "wrong"}, timeout=10).status_code == 403
    assert requests.get(url, headers={"X-API-Key": KEY}, timeout=10).status_code == 200


# ---- Empty state.

def test_empty_state_shows_a_curl_line_that_sends_a_first_event(empty_server, page):
    open_page(page, empty_server.url + "/")
    empty = page.find_element(By.ID, "empty")
    assert empty.is_displayed()
    assert not page.find_element(By.ID, "main").is_displayed()
    curl = page.find_element(By.ID, "curl").text
    assert curl.startswith(f"curl -X POST {empty_server.url}/track")
    assert "X-API-Key" not in curl  # this server has no key
    screenshot(page, "empty", 375, 800)
    out = subprocess.run(["bash", "-c", curl + " -s -o /dev/null -w '%{http_code}'"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "201", out
    page.refresh()
    wait(page, lambda d: loaded(d) > 0 and d.find_element(By.ID, "main").is_displayed())
    assert_page_matches(page, analytics(empty_server.url, "my-first-business", 30))
    assert_clean_console(page)


# ---- The figures are /analytics' figures.

@pytest.fixture(scope="module")
def businesses(server):
    """Three businesses with 14, 8 and 4 known messages, sent through /track."""
    names = [f"dash-{label}-{uuid.uuid4().hex[:6]}" for label in ("busy", "mid", "quiet")]
    for name, count, seed in zip(names, (14, 8, 4), (1, 2, 3), strict=True):
        events = varied(count, [name], seed=seed)
        for i, event in enumerate(events):
            event["tokens_used"] += 400 * (i % 2)  # thousands, so separators show
        track(server.url, events)
    return names


def test_plain_url_opens_the_busiest_business_with_the_analytics_figures(
        server, businesses, page):
    open_page(page, server.url + "/")
    wait(page, lambda d: d.find_element(By.ID, "main").is_displayed())
    body = analytics(server.url, businesses[0], 30)
    assert_page_matches(page, body)

    listed = requests.get(server.url + "/businesses", params={"days": 30}, timeout=10).json()
    options = Select(page.find_element(By.ID, "business")).options
    assert [o.get_attribute("value") for o in options] == \
        [b["business_id"] for b in listed["businesses"]]
    assert [b["business_id"] for b in listed["businesses"]] == businesses

    tokens = page.find_element(By.CSS_SELECTOR, "[data-metric=total_tokens]")
    assert tokens.text == f"{body['metrics']['total_tokens']:,}"  # formatted for people
    cost = page.find_element(By.CSS_SELECTOR, "[data-metric=total_api_cost_usd]")
    assert cost.text.startswith("$") and cost.get_attribute("title").endswith(" USD")
    p95 = page.find_element(By.CSS_SELECTOR, "[data-metric=p95_response_time_ms]")
    assert p95.text.endswith((" ms", " s"))
    rate = page.find_element(By.CSS_SELECTOR, "[data-metric=success_rate]")
    assert rate.text.endswith("%")

    screenshot(page, "dashboard", 1366, 900)
    screenshot(page, "dashboard", 375, 800)

    page.find_element(By.CSS_SELECTOR, "#daily-title ~ details summary").click()
    days = page.find_elements(By.CSS_SELECTOR, "#daily-table tbody tr")
    assert [d.find_element(By.TAG_NAME, "th").text for d in days] == \
        [d["date"] for d in reversed(body["daily"])]
    assert sum(int(d.find_elements(By.TAG_NAME, "td")[0].text.replace(",", ""))
               for d in days) == body["metrics"]["total_messages"]
    assert len(page.find_elements(By.CSS_SELECTOR, ".chart canvas")) >= 3
    assert page.find_element(By.CSS_SELECTOR, "[data-state=up]").text == "Database up"

    assert_clean_console(page)


def test_mobile_width_has_no_horizontal_scroll(server, businesses, page):
    open_page(page, server.url + "/")
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 375, "height": 800, "deviceScaleFactor": 1, "mobile": True})
    try:
        wait(page, lambda d: d.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"),
            message="the page scrolls sideways at 375 px")
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert_clean_console(page)


def test_switching_business_and_window_updates_the_figures(server, businesses, page):
    busy, mid, quiet = businesses
    open_page(page, server.url + "/")
    before = loaded(page)
    Select(page.find_element(By.ID, "business")).select_by_value(mid)
    wait_refreshed_after(page, before)
    assert_page_matches(page, analytics(server.url, mid, 30))
    assert f"business_id={mid}" in page.current_url

    # One more message, then the window changes by keyboard (arrow key on the
    # radio group): the page must fetch the 7-day figures afresh.
    track(server.url, varied(1, [mid], seed=99))
    before = loaded(page)
    page.find_element(By.ID, "days-30").send_keys(Keys.ARROW_LEFT)
    wait_refreshed_after(page, before)
    assert page.find_element(By.ID, "days-7").is_selected()
    body = analytics(server.url, mid, 7)
    assert body["metrics"]["total_messages"] == 9
    assert_page_matches(page, body)
    assert "days=7" in page.current_url
    fetched = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(f"/analytics/{mid}?days=7" in url for url in fetched)

    # A link to a business and a window opens them.
    open_page(page, f"{server.url}/?business_id={quiet}&days=1")
    assert page.find_element(By.ID, "days-1").is_selected()
    assert_page_matches(page, analytics(server.url, quiet, 1))
    assert_clean_console(page)


def test_controls_are_labelled_and_reachable_by_keyboard(server, businesses, page):
    open_page(page, server.url + "/")
    unlabelled = page.execute_script(
        "return [...document.querySelectorAll('input, select')]"
        ".filter(e => !e.labels || !e.labels.length).map(e => e.id || e.name)")
    assert unlabelled == []
    assert len(page.find_elements(By.TAG_NAME, "h1")) == 1
    for landmark in ("header", "main", "footer"):
        assert page.find_elements(By.TAG_NAME, landmark), landmark
    for chart in page.find_elements(By.CSS_SELECTOR, ".chart"):
        assert chart.get_attribute("role") == "img" and "table" in chart.get_attribute(
            "aria-label")  # the figures are in #daily-table
    assert page.find_elements(By.CSS_SELECTOR, "#daily-table th[scope=col]")

    page.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    reached = []
    for _ in range(4):
        element = page.switch_to.active_element
        reached.append(element.get_attribute("id") or element.get_attribute("class"))
        element.send_keys(Keys.TAB)
    assert reached[:3] == ["skip", "business", "days-30"], reached
    assert_clean_console(page)


def test_refresh_pauses_while_hidden_and_runs_when_visible(server, businesses, page):
    busy = businesses[0]
    open_page(page, f"{server.url}/?business_id={busy}")
    body = page.find_element(By.TAG_NAME, "body")
    assert body.get_attribute("data-refresh") == "running"
    page.execute_script(SET_HIDDEN, True)
    assert body.get_attribute("data-refresh") == "paused"
    track(server.url, varied(2, [busy], seed=42))
    before = loaded(page)
    page.execute_script(SET_HIDDEN, False)  # back in view: refreshes at once
    wait_refreshed_after(page, before)
    assert body.get_attribute("data-refresh") == "running"
    assert_page_matches(page, analytics(server.url, busy, 30))
    assert_clean_console(page)


def test_intent_mix_is_shown(server, businesses, page):
    body = analytics(server.url, businesses[0], 30)
    assert len(body["by_intent"]) > 1
    open_page(page, f"{server.url}/?business_id={businesses[0]}")
    rows = page.find_elements(By.CSS_SELECTOR, "#intent-table tbody tr")
    shown = {r.find_element(By.TAG_NAME, "th").text:
             int(r.find_elements(By.TAG_NAME, "td")[0].get_attribute("title"))
             for r in rows}
    assert shown == {i["intent_detected"]: i["messages"] for i in body["by_intent"]}
    assert not page.find_element(By.ID, "intents-missing").is_displayed()
    assert_clean_console(page)


DAY_SECONDS = 86400
# What each chart shows: ``daily`` row key, and the value of a day without messages.
CHARTS = {"chart-messages": ("messages", 0), "chart-cost": ("cost_usd", 0),
          "chart-latency": ("p95_response_time_ms", None)}  # no reply, no reply time


@pytest.mark.parametrize("window", [30, 1])
def test_day_by_day_charts_span_the_window_with_days_without_messages_at_zero(
        server, page, window):
    """One day of data: the x axis has every UTC day of the window, the others at zero."""
    business = f"dash-one-day-{uuid.uuid4().hex[:6]}"
    track(server.url, varied(3, [business], seed=11))
    body = analytics(server.url, business, window)
    (today,) = body["daily"]
    today_t = int(datetime.fromisoformat(today["date"]).replace(tzinfo=UTC).timestamp())
    days = [today_t - DAY_SECONDS * (window - 1 - i) for i in range(window)]
    open_page(page, f"{server.url}/?business_id={business}&days={window}")
    charts = page.execute_script(
        "return Object.fromEntries(Object.entries(window.mlopsDashboard.charts).map("
        "([id, u]) => [id, {xs: u.data[0], ys: u.data[1], min: u.scales.x.min,"
        " max: u.scales.x.max}]))")
    assert set(charts) == set(CHARTS)
    for chart_id, (key, empty) in CHARTS.items():
        chart = charts[chart_id]
        assert chart["xs"] == days, chart_id
        assert chart["ys"][:-1] == [empty] * (window - 1), chart_id
        assert chart["ys"][-1] == pytest.approx(float(today[key])), chart_id
        # the axis runs from the first day to today, half a day either side
        assert chart["min"] == days[0] - DAY_SECONDS / 2, chart_id
        assert chart["max"] == days[-1] + DAY_SECONDS / 2, chart_id
    screenshot(page, f"one-day-of-{window}", 1366, 900)
    assert_clean_console(page)


def test_a_total_of_millions_fits_its_tile_on_one_line(server, page):
    """1,234,567 would wrap in its tile at 1366 px: it shows as 1.23M, exact in the title."""
    business = f"dash-millions-{uuid.uuid4().hex[:6]}"
    event = varied(1, [business], seed=12)[0]
    event.update(tokens_used=1_234_567, prompt_tokens=1_000_000, completion_tokens=234_567)
    track(server.url, [event])
    open_page(page, f"{server.url}/?business_id={business}")
    tokens = page.find_element(By.CSS_SELECTOR, "[data-metric=total_tokens]")
    assert tokens.text == "1.23M"
    assert tokens.get_attribute("title") == "1234567"
    lines = page.execute_script(
        "const e = arguments[0]; const range = document.createRange();"
        "range.selectNodeContents(e);"
        "return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size", tokens)
    assert lines == 1
    assert_clean_console(page)


def test_the_cost_is_the_price_beside_the_client_estimate_and_unpriced_models_are_named(
        server, page):
    """The cost tile shows the service's price, "client estimate +72%" under it, and
    the models no price table knows by name; their cost is "unpriced", never $0."""
    business = f"dash-prices-{uuid.uuid4().hex[:6]}"
    course = {**SUCCESS, "business_id": business}
    unknown = {**course, "model_name": "acme-chat-7b"}
    track(server.url, [course, unknown, {**unknown, "session_id": "sess_2"}])
    open_page(page, f"{server.url}/?business_id={business}&days=1")
    body = analytics(server.url, business, 1)
    assert_page_matches(page, body)
    cost = page.find_element(By.CSS_SELECTOR, "[data-metric=total_cost_usd]")
    assert float(cost.get_attribute("title").split()[0]) == pytest.approx(4.485e-05)
    assert cost.text.startswith("$0.0000")
    note = page.find_element(By.ID, "client-estimate")
    assert note.text.startswith("client estimate +72% ($")
    assert page.find_element(By.ID, "client-estimate-difference").text == "+72%"
    unpriced = page.find_element(By.ID, "unpriced")
    assert unpriced.is_displayed()
    assert "2 calls of models" in unpriced.text and "PRICES_FILE" in unpriced.text
    assert [li.text for li in unpriced.find_elements(By.CSS_SELECTOR, "#unpriced-models li")] \
        == ["acme-chat-7b — 2 calls"]
    rows = {row.find_element(By.TAG_NAME, "th").text: row.find_elements(By.TAG_NAME, "td")
            for row in page.find_elements(By.CSS_SELECTOR, "#model-table tbody tr")}
    assert rows["acme-chat-7b"][2].text == "unpriced"
    assert rows["gemini-1.5-flash"][2].text.startswith("$0.0000")
    assert_clean_console(page)


# ---- Error states.

def test_key_is_asked_once_kept_in_the_tab_and_never_put_in_a_url(keyed_server, page):
    business = f"dash-keyed-{uuid.uuid4().hex[:6]}"
    track(keyed_server.url, varied(3, [business]), key=KEY)
    open_page(page, f"{keyed_server.url}/?business_id={business}")
    form = page.find_element(By.ID, "key-form")
    assert form.is_displayed() and form.get_attribute("data-reason") == "missing"
    assert page.switch_to.active_element.get_attribute("id") == "api-key"
    screenshot(page, "api-key", 1366, 900)

    before = loaded(page)
    page.switch_to.active_element.send_keys("not-the-key" + Keys.ENTER)
    wait_refreshed_after(page, before)
    assert form.get_attribute("data-reason") == "refused"
    assert page.find_element(By.ID, "key-title").text == "That API key was refused"
    assert page.execute_script("return sessionStorage.length") == 0

    before = loaded(page)
    field = page.find_element(By.ID, "api-key")
    field.send_keys(KEY)
    page.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_refreshed_after(page, before)
    wait(page, lambda d: d.find_element(By.ID, "main").is_displayed())
    assert_page_matches(page, analytics(keyed_server.url, business, 30, key=KEY))

    page.refresh()  # same tab: the key is remembered, not asked again
    wait(page, lambda d: loaded(d) > 0 and d.find_element(By.ID, "main").is_displayed())
    assert not page.find_element(By.ID, "key-form").is_displayed()
    urls = page.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
    assert not [u for u in urls if KEY in u or "not-the-key" in u]
    page.execute_script("sessionStorage.clear()")
    assert_clean_console(page, allow_statuses=(401, 403))


def test_a_database_outage_is_shown_and_the_page_recovers(outage, page):
    cluster, srv = outage
    business = f"dash-outage-{uuid.uuid4().hex[:6]}"
    track(srv.url, varied(3, [business]))
    open_page(page, f"{srv.url}/?business_id={business}")
    assert page.find_element(By.ID, "main").is_displayed()

    cluster.stop()
    response = requests.get(srv.url + "/businesses", timeout=30)
    assert response.status_code == 503
    assert response.json()["error"] == "database_unavailable"
    event = varied(1, [business], seed=5)[0]
    assert requests.post(srv.url + "/track", json=event, timeout=30).status_code == 202

    # Figures already on screen stay, greyed, under the alert.
    refresh_now(page)
    alert = page.find_element(By.ID, "alert")
    assert alert.is_displayed() and alert.get_attribute("data-error") == "database_unavailable"
    assert "database is unavailable" in alert.text
    assert page.find_element(By.ID, "main").is_displayed()
    assert "stale" in page.find_element(By.TAG_NAME, "body").get_attribute("class")
    assert page.find_element(By.ID, "db-state").text == "Database down"
    assert page.find_element(By.ID, "spool-state").text == "Spool: 1 event waiting"

    # A page opened during the outage has no figures to show, only the alert.
    open_page(page, srv.url + "/")
    assert page.find_element(By.ID, "alert").is_displayed()
    assert not page.find_element(By.ID, "main").is_displayed()
    screenshot(page, "database-down", 1366, 900)
    assert_clean_console(page, allow_statuses=(503,))

    cluster.start()
    wait(page, lambda d: requests.get(srv.url + "/health/detailed", timeout=10)
         .json()["spool"]["depth"] == 0, timeout=30, message="the spool never drained")
    open_page(page, f"{srv.url}/?business_id={business}")
    assert not page.find_element(By.ID, "alert").is_displayed()
    body = analytics(srv.url, business, 30)
    assert body["metrics"]["total_messages"] == 4
    assert_page_matches(page, body)
    assert page.find_element(By.ID, "db-state").text == "Database up"
    assert_clean_console(page)


def test_console_check_catches_a_csp_violation(server, page):
    """The page's CSP blocks inline script, and the console check reports the violation."""
    open_page(page, server.url + "/")
    assert_clean_console(page)
    page.execute_script(
        "const s = document.createElement('script');"
        "s.textContent = 'document.body.dataset.inline = \"ran\"';"
        "document.head.append(s);")
    assert page.find_element(By.TAG_NAME, "body").get_attribute("data-inline") is None
    entries = []
    wait(page, lambda d: entries.extend(console(d)) or console_problems(entries),
         timeout=5, message="no CSP violation in the console")
    assert any("Content Security Policy" in p for p in console_problems(entries))


def test_committed_screenshot_is_a_real_png():
    png = SERVICE_DIR.parent / "docs" / "dashboard.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "docs/dashboard.png" in (SERVICE_DIR.parent / "README.md").read_text()
