"""The service's own price of every stored call (mlops/prices.py), beside the client's figure.

Real Postgres throughout (the conftest's database); the price table is the
genai-prices data bundled in the installed wheel, and overrides files are
real files read at start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from conftest import empty_tables, metric_sum, metric_values, query
from genai_prices import Usage, data_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from payloads import FAILURE, SUCCESS, varied
from rollup_checks import assert_matches_raw
from servers import Gunicorn

from mlops import price_overrides, price_rates, prices, store
from mlops.config import ConfigError, Settings
from mlops.db import Database
from mlops.deliver import Delivery
from mlops.maintenance import Maintenance
from mlops.outbox import Outbox
from mlops.schemas import MetricsEvent, Record
from mlops.spool import Spool
from mlops.telemetry import Telemetry

# Google's list price of gemini-1.5-flash (prompts up to 128k tokens), USD per
# million tokens: https://ai.google.dev/gemini-api/docs/pricing (as of 2024-10).
FLASH_INPUT, FLASH_OUTPUT = Decimal("0.075"), Decimal("0.30")
# The course client's message: 350 prompt + 62 completion tokens.
COURSE_PRICE = (350 * FLASH_INPUT + 62 * FLASH_OUTPUT) / 1_000_000  # 0.00004485


@pytest.fixture(autouse=True)
def bundled_table():
    """Each test starts, and leaves the process, with the bundled table."""
    prices.configure(prices.Table())
    yield
    prices.configure(prices.Table())


@pytest.fixture
def db(database_url):
    database = Database(Settings.from_env({"DATABASE_URL": database_url}))
    yield database
    database.close()
    empty_tables(database_url)


def record(event: dict, received_at: datetime | None = None) -> Record:
    return Record(str(uuid.uuid4()), received_at or datetime.now(UTC),
                  MetricsEvent.model_validate(event))


def stored(pg, business: str) -> list[tuple]:
    return query(pg, "SELECT model_name, price_usd, price_status, api_cost_usd FROM mlops_events "
                     "WHERE business_id = %s ORDER BY id", business)


def write_prices(tmp_path, entries) -> str:
    path = tmp_path / "prices.json"
    path.write_text(entries if isinstance(entries, str) else json.dumps({"prices": entries}))
    return str(path)


# --- the table ------------------------------------------------------------------

def test_the_course_message_is_priced_at_the_list_price_and_both_figures_are_kept(client, pg):
    business = str(uuid.uuid4())
    assert client.post("/track", json={**SUCCESS, "business_id": business}).status_code == 201
    assert stored(pg, business) == [
        ("gemini-1.5-flash", COURSE_PRICE, "priced", Decimal("0.000077"))]
    body = client.get(f"/analytics/{business}?days=1").get_json()
    assert Decimal(str(body["metrics"]["total_cost_usd"])) == COURSE_PRICE
    assert body["metrics"]["total_api_cost_usd"] == pytest.approx(7.7e-05)
    cost = body["cost"]
    assert cost["priced_messages"] == 1 and cost["unpriced_models"] == []
    # The client's blended rate is 72 % above the list price.
    assert cost["client_estimate_difference"] == pytest.approx(7.7e-05 / 4.485e-05 - 1)
    assert round(cost["client_estimate_difference"] * 100) == 72
    assert body["by_model"][0]["cost_usd"] == pytest.approx(4.485e-05)
    assert body["daily"][0]["cost_usd"] == pytest.approx(4.485e-05)
    assert_matches_raw(pg, body, business, 1)


def test_a_client_cost_of_zero_is_left_out_of_the_comparison(client):
    business = str(uuid.uuid4())
    otlp_like = {**SUCCESS, "business_id": business, "api_cost_usd": 0}
    assert client.post("/track/batch", json=[otlp_like, {**otlp_like}]).status_code == 207
    cost = client.get(f"/analytics/{business}?days=1").get_json()["cost"]
    assert cost["cost_usd"] == pytest.approx(2 * 4.485e-05)
    assert cost["client_estimate_difference"] is None
    assert cost["compared_cost_usd"] == 0


def test_provider_and_cached_tokens_from_the_extra_fields(client, pg):
    """gen_ai.provider.name picks the provider; cached input tokens get the cache rate."""
    business = str(uuid.uuid4())
    event = {**SUCCESS, "business_id": business, "model_name": "gpt-4o",
             "gen_ai.provider.name": "openai", "gen_ai.usage.cache_read.input_tokens": 100}
    wrong_provider = {**SUCCESS, "business_id": business, "gen_ai.provider.name": "openai"}
    semconv_name = {**SUCCESS, "business_id": business, "gen_ai.provider.name": "gcp.gemini"}
    assert client.post("/track/batch", json=[event, wrong_provider, semconv_name]).status_code \
        == 207
    # gpt-4o: 2.50 input, 1.25 cached input, 10.00 output USD per million tokens.
    gpt = (250 * Decimal("2.5") + 100 * Decimal("1.25") + 62 * Decimal(10)) / 1_000_000
    # Rows are stored in event_id order (store.insert_sql): compare as multisets.
    assert sorted(row[1:3] for row in stored(pg, business)) == sorted([
        (gpt, "priced"), (COURSE_PRICE, "priced"), (COURSE_PRICE, "priced")])


def test_only_total_tokens_are_priced_as_input_and_marked_estimated(client, pg):
    business = str(uuid.uuid4())
    total_only = {k: v for k, v in SUCCESS.items() if k not in ("prompt_tokens",
                                                                 "completion_tokens")}
    assert client.post("/track", json={**total_only, "business_id": business}).status_code == 201
    assert [row[1:3] for row in stored(pg, business)] == [
        (412 * FLASH_INPUT / 1_000_000, "estimated")]
    cost = client.get(f"/analytics/{business}?days=1").get_json()["cost"]
    assert (cost["priced_messages"], cost["estimated_messages"]) == (1, 1)


def test_an_unknown_model_is_unpriced_never_zero_in_analytics_and_metrics(client, pg):
    business = str(uuid.uuid4())
    events = [{**SUCCESS, "business_id": business, "model_name": "acme-chat-7b"},
              {**SUCCESS, "business_id": business, "model_name": "acme-chat-7b"},
              {**SUCCESS, "business_id": business}]
    assert client.post("/track/batch", json=events).status_code == 207
    assert sorted(row[:3] for row in stored(pg, business)) == [
        ("acme-chat-7b", None, "unpriced"), ("acme-chat-7b", None, "unpriced"),
        ("gemini-1.5-flash", COURSE_PRICE, "priced")]
    body = client.get(f"/analytics/{business}?days=1").get_json()
    cost = body["cost"]
    assert cost["unpriced_models"] == [{"model_name": "acme-chat-7b", "messages": 2}]
    assert cost["unpriced_messages"] == 2 and cost["priced_messages"] == 1
    assert "acme-chat-7b (2)" in cost["unpriced"] and "PRICES_FILE" in cost["unpriced"]
    assert Decimal(str(cost["cost_usd"])) == COURSE_PRICE  # the unpriced calls add nothing
    by_model = {m["model_name"]: m for m in body["by_model"]}
    assert by_model["acme-chat-7b"]["unpriced_messages"] == 2
    assert by_model["acme-chat-7b"]["cost_usd"] == 0
    values = metric_values(client.get("/metrics").get_data(as_text=True))
    assert metric_sum(values, "mlops_unpriced_events_total", model_name="acme-chat-7b") == 2
    assert metric_sum(values, "ai_cost_usd_total", business_id=business,
                      model_name="acme-chat-7b") == 0
    assert metric_sum(values, "ai_cost_usd_total", business_id=business) \
        == pytest.approx(4.485e-05)
    assert_matches_raw(pg, body, business, 1)


def test_businesses_and_the_gauges_show_both_costs(client):
    business = str(uuid.uuid4())
    assert client.post("/track", json={**SUCCESS, "business_id": business}).status_code == 201
    rows = {b["business_id"]: b for b in client.get("/businesses?days=1").get_json()["businesses"]}
    assert rows[business]["cost_usd"] == pytest.approx(4.485e-05)
    assert rows[business]["api_cost_usd"] == pytest.approx(7.7e-05)
    client.post("/refresh-metrics", json={})
    values = metric_values(client.get("/metrics").get_data(as_text=True))
    assert metric_sum(values, "mlops_business_cost_usd_30d", business_id=business) \
        == pytest.approx(4.485e-05)
    assert metric_sum(values, "mlops_business_api_cost_usd_30d", business_id=business) \
        == pytest.approx(7.7e-05)


def test_rates_agree_with_genai_prices_for_every_model_of_the_table():
    """The cached rate arithmetic (price_rates.Rates) equals genai-prices' own calc_price,
    tiers, cache and per-request prices included, for every model it lists."""
    at = datetime.now(UTC)
    checked = 0
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            for usage in ((350, 62, 0), (350, 62, 100), (300_000, 5_000, 1_000)):
                try:
                    expected = model.calc_price(
                        Usage(input_tokens=usage[0], output_tokens=usage[1],
                              cache_read_tokens=usage[2]), provider,
                        genai_request_timestamp=at).total_price
                except Exception:  # prices needing other units (audio, images ...)
                    continue
                rates = price_rates.Rates.from_model_price(model.get_prices(at), "test")
                assert rates.cost(*usage) == expected, (provider.id, model.id, usage)
                assert Decimal(rates.picodollars(*usage)).scaleb(-12) == expected.quantize(
                    Decimal('1e-12'), rounding=ROUND_HALF_UP), (provider.id, model.id, usage)
                checked += 1
    assert checked > 1000


def test_rates_finer_than_a_picodollar_per_token_are_priced_exactly():
    """Rates that are not whole picodollars per token take the Decimal path: exact, then
    rounded to the picodollar (the stored scale)."""
    fine = price_rates.Rates(Decimal("0.0000001"), Decimal("0.3333333"), None, None, "test")
    assert fine.cost(350, 62, 100) == (350 * Decimal("0.0000001")
                                       + 62 * Decimal("0.3333333")) / 1_000_000
    # In whole picodollars, rounded half away from zero as numeric(24, 12) stores it.
    assert fine.picodollars(350, 62, 100) == 20_666_700
    assert fine.picodollars(0, 3, 0) == 1_000_000
    whole = price_rates.Rates(Decimal("0.075"), Decimal("0.3"), Decimal("0.01875"), Decimal(5), "t")
    assert whole.cost(350, 62, 100) == (250 * Decimal("0.075") + 100 * Decimal("0.01875")
                                        + 62 * Decimal("0.3")) / 1_000_000 + Decimal("0.005")


def test_prices_follow_the_calls_date():
    """A price change in the table applies from its UTC date: claude-opus-4-6's long
    prompts (over 200k tokens) cost 10 USD per million input tokens until 2026-03-12,
    then 5 (genai-prices' data)."""
    table = prices.Table()

    def opus(day):
        return table.price("claude-opus-4-6", datetime(*day, 23, 59, tzinfo=UTC),
                           provider="anthropic", input_tokens=300_000, output_tokens=0,
                           total_tokens=300_000).cost_usd
    assert (opus((2026, 3, 12)), opus((2026, 3, 13))) == (Decimal(3), Decimal("1.5"))


# --- overrides ----------------------------------------------------------------------

def test_an_override_file_prices_a_custom_model_and_a_local_one_at_zero(make_app, tmp_path, pg):
    path = write_prices(tmp_path, [
        {"model": "acme-chat-*", "input_per_mtok": 1.5, "output_per_mtok": 6},
        {"model": "llama3*", "input_per_mtok": 0, "output_per_mtok": 0},
        {"model": "gemini-1.5-flash", "provider": "acme-gateway", "input_per_mtok": 9,
         "output_per_mtok": 9},
        {"model": "acme-chat-*", "input_per_mtok": 2, "output_per_mtok": 8,
         "valid_from": "2999-01-01"},
    ])
    client = make_app(PRICES_FILE=path).test_client()
    business = str(uuid.uuid4())
    events = [{**SUCCESS, "business_id": business, "model_name": "ACME-chat-7b"},
              {**SUCCESS, "business_id": business, "model_name": "llama3.1:8b"},
              {**SUCCESS, "business_id": business},
              {**SUCCESS, "business_id": business, "gen_ai.provider.name": "acme-gateway"}]
    assert client.post("/track/batch", json=events).status_code == 207
    assert sorted(row[1:3] for row in stored(pg, business)) == sorted([
        ((350 * Decimal("1.5") + 62 * 6) / 1_000_000, "priced"),
        (Decimal(0), "priced"),
        (COURSE_PRICE, "priced"),  # the bundled table: the override names another provider
        (Decimal(412 * 9) / 1_000_000, "priced")])
    health = client.get("/health/detailed").get_json()
    assert health["price_table"].startswith("genai-prices-0.") and "+overrides-" in \
        health["price_table"]
    info = metric_values(client.get("/metrics").get_data(as_text=True))
    assert metric_sum(info, "mlops_build_info", price_table=health["price_table"]) == 1


@pytest.mark.parametrize(("content", "says"), [
    ({"prices": [{"model": "a*", "input_per_mtok": 1, "output_per_mtok": 1},
                 {"model": "local-*", "input_per_mtok": -1, "output_per_mtok": 0}]},
     "entry 2 (model 'local-*'): input_per_mtok: Input should be greater than or equal to 0"),
    ({"prices": [{"model": "x", "input_per_mtok": 1}]},
     "entry 1 (model 'x'): output_per_mtok: Field required"),
    ({"prices": [{"model": "x", "input_per_mtok": 1, "output_per_mtok": 1, "ouput": 2}]},
     "entry 1 (model 'x'): ouput: Extra inputs are not permitted"),
    ({"prices": [{"model": "x", "input_per_mtok": 1, "output_per_mtok": 1,
                  "valid_from": "soon"}]}, "entry 1 (model 'x'): valid_from:"),
    ({"prices": [{"model": "x", "input_per_mtok": 1, "output_per_mtok": 1},
                 {"model": "X", "input_per_mtok": 2, "output_per_mtok": 2}]},
     "entry 2 (model 'X'): same model, provider and valid_from as entry 1"),
    ('{"prices": [', "is not valid JSON"),
    ({"models": []}, "file: prices: Field required"),
])
def test_a_bad_override_file_refuses_the_start_with_one_line(tmp_path, service_env, content,
                                                               says):
    path = write_prices(tmp_path, content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as error:
        Settings.from_env({**service_env, "PRICES_FILE": path})
    assert says in str(error.value) and path in str(error.value)
    assert "\n" not in str(error.value)


def test_gunicorn_refuses_to_start_on_a_bad_override_file_with_one_line(tmp_path, database_url):
    path = write_prices(tmp_path, [{"model": "llama3*", "input_per_mtok": 0,
                                    "output_per_mtok": "free"}])
    server = Gunicorn({"DATABASE_URL": database_url, "LOG_DIR": str(tmp_path),
                       "SPOOL_DIR": str(tmp_path), "PRICES_FILE": path})
    with pytest.raises(RuntimeError, match="exited 1"):
        server.start()
    log = server.log()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "cannot start" in line] == [
        f"mlops-service: cannot start: PRICES_FILE {path}: entry 1 (model 'llama3*'): "
        "output_per_mtok: Input should be a valid decimal"]


def test_a_missing_override_file_refuses_the_start(service_env, tmp_path):
    with pytest.raises(ConfigError, match="PRICES_FILE .*nothing.json cannot be read"):
        Settings.from_env({**service_env, "PRICES_FILE": str(tmp_path / "nothing.json")})


def test_events_delivered_from_the_spool_are_priced_by_the_same_table(database_url, tmp_path,
                                                                       pg):
    """The spool keeps events as they came (its format has no price); the process that
    delivers them prices them, with its table, at their receive time."""
    prices.configure(prices.Table.from_file(Path(write_prices(tmp_path, [
        {"model": "acme-*", "input_per_mtok": 1, "output_per_mtok": 2}]))))
    db = Database(Settings.from_env({"DATABASE_URL": database_url}))
    spool = Spool(tmp_path / "spool", 1 << 24)
    box = Outbox(spool, Delivery(db, Telemetry(max_series=100)),
                 timeout_ms=2000)
    business = str(uuid.uuid4())
    received = datetime.now(UTC) - timedelta(hours=1)
    box.put([Record(str(uuid.uuid4()), received, MetricsEvent.model_validate(
        {**SUCCESS, "business_id": business, "model_name": m}))
        for m in ("acme-chat-7b", "gemini-1.5-flash")])
    try:
        assert box.flush_once() == 2
    finally:
        box.stop(0)
        spool.close()
        db.close()
    assert sorted(row[1:3] for row in stored(pg, business)) == sorted([
        ((350 + 2 * 62) / Decimal(1_000_000), "priced"), (COURSE_PRICE, "priced")])
    assert_price_sums_match_raw(pg, business)
    empty_tables(database_url)


# --- history: the maintenance job and reprice -----------------------------------------

def store_unpriced(db, events: list[dict], days_ago: int = 0) -> list[Record]:
    """Store ``events`` as a server with pricing off does (price_status NULL)."""
    prices.configure(prices.Table(enabled=False))
    records = [record(e, datetime.now(UTC) - timedelta(days=days_ago)) for e in events]
    store.insert_events(db, records, 5000)
    prices.configure(prices.Table())
    return records


def test_the_backfill_prices_old_events_once_and_the_rollups_equal_raw_sums(db, pg):
    business = str(uuid.uuid4())
    old = varied(120, [business], seed=3)
    old[0] = {**old[0], "model_name": "acme-chat-7b"}
    for days_ago in (0, 2):
        store_unpriced(db, old[days_ago * 30:days_ago * 30 + 60], days_ago)
    # What the migration does on a database holding events: they await a price.
    query(pg, "UPDATE mlops_price_backfill SET high_water = (SELECT max(id) FROM mlops_events), "
              "done_through = (SELECT min(id) - 1 FROM mlops_events) RETURNING 1")
    store.insert_events(db, [record({**SUCCESS, "business_id": business})], 5000)  # priced now
    before = store.analytics(db, business, 7)["cost"]
    assert before["pending_messages"] == 120
    job = Maintenance(db, retention_days=None, rollup_retention_days=None, batch_rows=25,
                      interval_seconds=0)
    assert job.run_once()["priced"] == 120
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE price_status IS NULL") == [(0,)]
    after = store.analytics(db, business, 7)
    assert after["cost"]["pending_messages"] == 0
    assert after["cost"]["unpriced_models"] == [{"model_name": "acme-chat-7b", "messages": 1}]
    assert_price_sums_match_raw(pg, business)
    assert_matches_raw(pg, after, business, 7)
    assert job.run_once()["priced"] == 0  # idempotent once finished
    assert store.analytics(db, business, 7) == after


def test_reprice_prices_a_window_again_with_the_current_table(db, pg, tmp_path, database_url):
    business = str(uuid.uuid4())
    store.insert_events(db, [record({**SUCCESS, "business_id": business, "model_name": m})
                             for m in ("acme-chat-7b", "gemini-1.5-flash")], 5000)
    store.insert_events(db, [record({**SUCCESS, "business_id": business}, datetime.now(UTC)
                                    - timedelta(days=3))], 5000)
    assert_price_sums_match_raw(pg, business)
    path = write_prices(tmp_path, [{"model": "acme-*", "input_per_mtok": 1,
                                    "output_per_mtok": 1}])
    today = datetime.now(UTC).date()
    done = subprocess.run(
        [sys.executable, "-m", "mlops.reprice", "--since", str(today), "--until",
         str(today + timedelta(days=1))],
        env={"DATABASE_URL": database_url, "PRICES_FILE": path, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, cwd=Path(store.__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert "reprice: 2 events received from" in done.stdout  # today's, not the older one
    assert ", 1 with a new price (genai-prices-" in done.stdout
    assert sorted(row[1:3] for row in stored(pg, business)) == sorted([
        (Decimal(412) / 1_000_000, "priced"), (COURSE_PRICE, "priced"), (COURSE_PRICE, "priced")])
    assert_price_sums_match_raw(pg, business)
    cost = store.analytics(db, business, 7)["cost"]
    assert cost["unpriced_models"] == [] and cost["priced_messages"] == 3


def test_reprice_beside_concurrent_inserts_keeps_the_rollups_exact(db, pg, database_url):
    """Inserts update the same rollup rows while reprice moves their price sums, back
    and forth between two tables: no deadlock, no lost update."""
    business = str(uuid.uuid4())
    override = prices.Table([price_overrides.PriceOverride(model="acme-*", input_per_mtok=1,
                                                  output_per_mtok=1)], "0" * 64)
    events = [{**e, "model_name": "acme-chat-7b" if i % 2 else e["model_name"]}
              for i, e in enumerate(varied(40, [business], seed=9))]
    failures = []

    def write():
        writer = Database(Settings.from_env({"DATABASE_URL": database_url}))
        try:
            for _ in range(25):  # the function (8 events) and COPY (40) inserts
                store.insert_events(writer, [record(e) for e in events[:8]], 5000)
                store.insert_events(writer, [record(e) for e in events], 5000)
        except Exception as exc:  # reported below
            failures.append(exc)
        finally:
            writer.close()

    threads = [threading.Thread(target=write) for _ in range(2)]
    for thread in threads:
        thread.start()
    since, until = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1)
    tables, passes = (override, prices.Table()), 0
    try:
        while any(thread.is_alive() for thread in threads) or passes < 2:
            store.reprice(db, since, until, tables[passes % 2], limit=50)
            passes += 1
    finally:
        for thread in threads:
            thread.join()
    assert failures == []
    assert_price_sums_match_raw(pg, business)


def test_folding_and_erasure_keep_the_price_sums_equal_to_the_raw_rows(db, pg):
    business = str(uuid.uuid4())
    events = varied(60, [business], seed=5)
    for i in range(0, 60, 3):
        events[i] = {**events[i], "model_name": "acme-chat-7b"}
    for days_ago in (0, 2, 3):
        for chunk in range(0, 60, 7):  # many small inserts: many shards
            store.insert_events(db, [record(e, datetime.now(UTC) - timedelta(days=days_ago))
                                     for e in events[chunk:chunk + 7]], 5000)
    assert store.fold_shards(db, 10_000) > 0
    assert_price_sums_match_raw(pg, business)
    conversation = events[0]["conversation_id"]
    store.erase_conversation(db, conversation, 5000)
    store.erase_session(db, events[1]["session_id"], 5000)
    assert query(pg, "SELECT count(*) FROM mlops_events WHERE conversation_id = %s",
                 conversation) == [(0,)]
    assert_price_sums_match_raw(pg, business)
    assert_matches_raw(pg, store.analytics(db, business, 7), business, 7)


RAW_PRICE_SUMS = f"""
SELECT (received_at AT TIME ZONE 'UTC')::date, model_name,
       {", ".join(expr for _, expr in store.PRICE_SUMS)}
FROM mlops_events WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2"""
ROLLUP_PRICE_SUMS = f"""
SELECT day, model_name, {", ".join(f"sum({name})" for name, _ in store.PRICE_SUMS)}
FROM mlops_rollup_daily WHERE business_id = %s GROUP BY 1, 2 ORDER BY 1, 2"""


def assert_price_sums_match_raw(pg, business: str) -> None:
    """Every price sum of the daily rollup equals the same sum over the raw rows."""
    assert query(pg, ROLLUP_PRICE_SUMS, business) == query(pg, RAW_PRICE_SUMS, business)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["gemini-1.5-flash", "gpt-4o-mini", "acme-1", "x"]),
                          st.integers(0, 200_000), st.integers(0, 5000),
                          st.booleans()), min_size=1, max_size=8))
def test_a_price_is_a_non_negative_number_or_unpriced(calls):
    table = prices.Table()
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for model, prompt, completion, split in calls:
        cost, status = table.price(model, at, input_tokens=prompt if split else None,
                                   output_tokens=completion if split else None,
                                   total_tokens=prompt + completion)
        assert (cost is None) == (status == prices.UNPRICED)
        assert cost is None or cost >= 0
        assert status == (prices.UNPRICED if cost is None else
                          prices.PRICED if split else prices.ESTIMATED)


def test_a_batch_is_priced_as_its_events_one_by_one():
    """Table.price_events (what the store prices a batch with) gives each event the price
    price_event gives it: known and unknown models, total-only, provider and cached
    tokens, two days."""
    from mlops.schemas import parse_event

    table = prices.Table()
    bodies = [SUCCESS, FAILURE, {**SUCCESS, "prompt_tokens": None, "completion_tokens": None},
              {**SUCCESS, "model_name": "gpt-4o-mini", "gen_ai.provider.name": "openai",
               "gen_ai.usage.cache_read.input_tokens": 100},
              {**SUCCESS, "model_name": "acme-chat-7b"},
              # Its long prompts cost less from 2026-03-13 (test_prices_follow_the_calls_date).
              {**SUCCESS, "model_name": "claude-opus-4-6", "gen_ai.provider.name": "anthropic",
               "prompt_tokens": 300_000, "completion_tokens": 0, "tokens_used": 300_000}]
    events = [parse_event(json.dumps(b).encode()) for b in bodies] * 2
    times = [datetime(2026, 1, 1, tzinfo=UTC)] * 6 + [datetime(2026, 3, 13, tzinfo=UTC)] * 6
    expected = [table.price_event(e, t) for e, t in zip(events, times, strict=True)]
    assert table.price_events(events, times) == expected
    assert {p.status for p in expected} == {prices.PRICED, prices.ESTIMATED, prices.UNPRICED}
    assert expected[5] != expected[11]  # the same call, priced by its day
    assert prices.Table(enabled=False).price_events(events, times) == [(None, None)] * 12
