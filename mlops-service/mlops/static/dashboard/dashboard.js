/* The mlops-service dashboard.
 *
 * Reads three endpoints of this origin and draws what they return; it
 * computes no figure of its own except the intent shares and the funnel bars:
 *   /businesses?days=N          the picker, busiest first
 *   /analytics/<id>?days=N      totals, cost (the service's price, the client's estimate,
 *                               unpriced models), by_model, daily (and by_intent when present)
 *   /health/detailed            database up, down or full, spool depth, database size
 * With a key configured the data endpoints answer 401/403: the page asks for
 * the key once, keeps it in sessionStorage (this tab only) and sends it as the
 * X-API-Key header, never in a URL. A key limited to some businesses gets
 * only those from /businesses, so the picker offers only them; a business it
 * does not reach (a hand-edited URL) answers 403 on /analytics and the page
 * says so, keeping the key. Refreshes every REFRESH_MS while the tab is visible.
 */
"use strict";

(() => {
  const REFRESH_MS = 20000;
  const KEY_STORAGE = "mlops-service.api-key";
  const WINDOWS = { 1: "last 24 hours", 7: "last 7 days", 30: "last 30 days", 90: "last 90 days" };
  const DAY_MS = 86400000;

  const $ = (selector) => document.querySelector(selector);

  const params = new URLSearchParams(window.location.search);
  const state = {
    businessId: params.get("business_id") || null,
    days: WINDOWS[params.get("days")] ? Number(params.get("days")) : 30,
    generation: 0, // a newer refresh makes older ones drop their answers
    timer: null,
    charts: {},
    shown: false, // figures are on screen (kept, marked stale, on a later error)
  };

  // ---- Numbers for people; the exact value goes in the title attribute.
  const numberFormat = (options) => new Intl.NumberFormat(undefined, options);
  const INTEGER = numberFormat({ maximumFractionDigits: 0 });
  const SECONDS = numberFormat({ maximumFractionDigits: 2 });
  const PERCENT = numberFormat({ style: "percent", maximumFractionDigits: 1 });
  const COMPACT = numberFormat({ notation: "compact", maximumFractionDigits: 2 });
  const FORMATS = {
    count: { text: (v) => INTEGER.format(v), unit: "" },
    // a total tile: a million and up as 1.27M, so the figure fits its tile on one line
    total: { text: (v) => (Math.abs(v) >= 1e6 ? COMPACT : INTEGER).format(v), unit: "" },
    usd: {
      // cents for a dollar or more; below, three significant digits ($0.0367)
      text: (v) => numberFormat(v === 0 || Math.abs(v) >= 1
        ? { style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 2 }
        : { style: "currency", currency: "USD", minimumSignificantDigits: 2,
            maximumSignificantDigits: 3 }).format(v),
      unit: " USD",
    },
    ms: { text: (v) => (v >= 1000 ? `${SECONDS.format(v / 1000)} s` : `${INTEGER.format(v)} ms`),
          unit: " ms" },
    rate: { text: (v) => PERCENT.format(v), unit: "" },
  };
  const METRIC_FORMATS = {
    total_messages: "total", total_conversations: "total", total_tokens: "total",
    total_cost_usd: "usd", total_api_cost_usd: "usd", success_rate: "rate",
    p50_response_time_ms: "ms",
    p95_response_time_ms: "ms", human_handoffs: "total", appointment_requests: "total",
    appointments_booked: "total", appointment_conversion_rate: "rate",
  };

  function show(element, value, kind) {
    const format = FORMATS[kind];
    const number = Number(value ?? 0);
    element.textContent = format.text(number);
    element.title = `${number}${format.unit}`;
    element.dataset.value = String(number);
  }

  // A table row whose first cell is its header (<th scope="row">label</th>).
  function headedRow(label) {
    const row = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = label;
    row.append(th);
    return row;
  }

  function cell(row, value, kind) {
    const td = row.insertCell();
    if (kind) {
      show(td, value, kind);
      td.className = "num";
    } else {
      td.textContent = value;
    }
    return td;
  }

  // ---- Talking to the service.
  class ServiceError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status; // HTTP status, or 0 when the service could not be reached
      this.code = code;
    }
  }

  async function getJSON(path) {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers["X-API-Key"] = key;
    let response;
    try {
      response = await fetch(path, { headers, cache: "no-store", credentials: "same-origin" });
    } catch (error) {
      throw new ServiceError(0, "unreachable", `cannot reach the service (${error.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      throw new ServiceError(response.status, body?.error || "http_error",
                             body?.message || `HTTP ${response.status}`);
    }
    return body;
  }

  // ---- One refresh: health, picker, analytics.
  async function refresh() {
    const generation = ++state.generation;
    const current = () => generation === state.generation;
    const health = getJSON("/health/detailed").then(
      (body) => current() && renderHealth(body),
      () => current() && renderHealth(null));
    try {
      await loadFigures(current);
    } catch (error) {
      if (current()) renderError(error);
    }
    await health;
    if (current()) {
      if (!$("#empty").hidden) renderCurl(); // needs the auth mode from /health/detailed
      $("#updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
      document.body.dataset.loaded = String(generation);
    }
  }

  // The picker, then the chosen business's figures (or the empty state).
  async function loadFigures(current) {
    const list = await getJSON(`/businesses?days=${state.days}`);
    if (!current()) return;
    const busiest = list.businesses[0]?.business_id;
    if (!state.businessId && busiest) state.businessId = busiest;
    renderPicker(list.businesses);
    if (!state.businessId) {
      showOnly("empty");
      return;
    }
    const path = `/analytics/${encodeURIComponent(state.businessId)}?days=${state.days}`;
    let data;
    try {
      data = await getJSON(path);
    } catch (error) {
      // /businesses took this key, so a 403 here is this business, not the key.
      if (error.status !== 403 || !current()) throw error;
      renderPicker(list.businesses, true);
      $("#refused-business").textContent = state.businessId;
      showOnly("refused");
      state.shown = false;
      return;
    }
    if (!current()) return;
    renderAnalytics(data);
    showOnly("main");
    state.shown = true;
  }

  function showOnly(which) {
    $("#main").hidden = which !== "main";
    $("#empty").hidden = which !== "empty";
    $("#key-form").hidden = which !== "key";
    $("#refused").hidden = which !== "refused";
    if (which !== "key") clearAlert();
  }

  function clearAlert() {
    const alert = $("#alert");
    alert.hidden = true;
    alert.textContent = "";
    delete alert.dataset.error;
    document.body.classList.remove("stale");
  }

  function renderError(error) {
    const picker = $("#business");
    if (picker.disabled) {
      picker.replaceChildren(new Option(error.status === 401 || error.status === 403
        ? "Needs the API key" : "Not available", ""));
    }
    if (error.status === 401 || error.status === 403) {
      askForKey(error);
      return;
    }
    const alert = $("#alert");
    alert.dataset.error = error.code;
    const title = document.createElement("strong");
    const detail = document.createElement("span");
    if (error.code === "database_unavailable") {
      title.textContent = "The database is unavailable. ";
      detail.textContent = "Figures cannot be read until it is back; events the chat app sends "
        + "meanwhile wait in the service's spool and are stored then. "
        + `(${error.message})`;
    } else if (error.status === 0) {
      title.textContent = "The service cannot be reached. ";
      detail.textContent = `Is it running? (${error.message})`;
    } else {
      title.textContent = `The service answered ${error.status}. `;
      detail.textContent = error.message;
    }
    alert.replaceChildren(title, detail);
    alert.hidden = false;
    if (state.shown) {
      document.body.classList.add("stale"); // keep the last figures, greyed
    } else {
      $("#main").hidden = true;
      $("#empty").hidden = true;
    }
  }

  function askForKey(error) {
    const refused = error.status === 403;
    if (refused) sessionStorage.removeItem(KEY_STORAGE);
    const form = $("#key-form");
    const wasHidden = form.hidden;
    form.dataset.reason = refused ? "refused" : "missing";
    $("#key-title").textContent = refused ? "That API key was refused"
                                          : "This service needs an API key";
    showOnly("key");
    state.shown = false;
    if (wasHidden) $("#api-key").focus();
  }

  // ---- Rendering.
  function renderHealth(body) {
    const db = $("#db-state");
    const spool = $("#spool-state");
    if (!body) {
      db.dataset.state = "down";
      db.textContent = "Service unreachable";
      spool.textContent = "Spool: –";
      return;
    }
    const up = body.database?.status === "up";
    const full = body.database?.status === "full";
    db.dataset.state = up ? "up" : "down";
    db.textContent = up ? "Database up" : (full ? "Database full" : "Database down");
    db.title = up ? `round trip ${body.database.latency_ms} ms` : (body.database?.error || "");
    renderStorage(body.storage, full);
    const depth = Number(body.spool?.depth ?? 0);
    spool.dataset.state = depth > 0 ? "waiting" : "empty";
    spool.textContent = `Spool: ${INTEGER.format(depth)} ${depth === 1 ? "event" : "events"} waiting`;
    spool.title = `${depth} events written locally, waiting for the database`;
    document.body.dataset.auth = body.auth || "";
  }

  // The database's size (pg_database_size, sampled each minute) against DATABASE_SIZE_LIMIT.
  const SIZE = (bytes) => {
    const [unit, scale] = bytes >= 1e9 ? ["gigabyte", 1e9] : ["megabyte", 1e6];
    return numberFormat({ style: "unit", unit, maximumFractionDigits: 1 }).format(bytes / scale);
  };

  function renderStorage(storage, full) {
    const pill = $("#storage-state");
    pill.hidden = storage?.size_bytes == null;
    if (pill.hidden) return;
    const ratio = storage.used_ratio;
    const parts = [`Storage: ${SIZE(storage.size_bytes)}`];
    if (storage.limit_bytes != null) {
      parts[0] += ` of ${SIZE(storage.limit_bytes)} (${INTEGER.format(ratio * 100)}%)`;
      if (storage.days_left != null) parts.push(`${INTEGER.format(storage.days_left)} days left`);
      else if (storage.growth_bytes_per_day != null) parts.push("not growing");
    }
    pill.textContent = parts.join(" · ");
    pill.dataset.state = full || ratio >= 0.95 ? "down" : (ratio >= 0.8 ? "waiting" : "up");
    pill.title = `${storage.size_bytes} bytes`
      + (storage.limit_bytes != null ? ` of DATABASE_SIZE_LIMIT ${storage.limit_bytes}` : "")
      + (storage.growth_bytes_per_day != null
        ? `; growing ${storage.growth_bytes_per_day} bytes a day (last 7 days)` : "")
      + `; sampled ${storage.sampled_at}`;
  }

  // The businesses /businesses listed, and the one asked for when it has no
  // message in the window; when that one was refused, none chosen instead.
  function renderPicker(businesses, refused = false) {
    const select = $("#business");
    const options = businesses.map((b) => {
      const option = new Option(`${b.business_id} — ${INTEGER.format(b.messages)} messages`,
                                b.business_id);
      option.title = `${b.messages} messages, ${b.tokens} tokens, ${b.cost_usd ?? b.api_cost_usd} USD`;
      return option;
    });
    if (refused) {
      options.unshift(new Option("Choose a business", ""));
    } else if (state.businessId
               && !businesses.some((b) => b.business_id === state.businessId)) {
      options.unshift(new Option(`${state.businessId} — no messages`, state.businessId));
    }
    if (!options.length) options.push(new Option("No business yet", ""));
    select.replaceChildren(...options);
    select.value = refused ? "" : state.businessId || "";
    select.disabled = !state.businessId;
  }

  function renderAnalytics(data) {
    const metrics = { ...data.metrics };
    // A service from before prices reports only the client's figure.
    if (!("total_cost_usd" in metrics)) metrics.total_cost_usd = metrics.total_api_cost_usd;
    $("#business-name").textContent = data.business_id;
    $("#window-name").textContent = `(${WINDOWS[state.days] || `last ${state.days} days`})`;
    document.querySelectorAll("[data-metric]").forEach((element) => {
      const key = element.dataset.metric;
      show(element, metrics[key], METRIC_FORMATS[key]);
    });
    $("#no-messages").hidden = metrics.total_messages > 0;
    const requested = metrics.appointment_requests;
    $("#bar-requested").style.width = requested > 0 ? "100%" : "0";
    $("#bar-booked").style.width = requested > 0
      ? `${Math.min(100, (100 * metrics.appointments_booked) / requested)}%` : "0";
    renderCost(data.cost);
    renderDaily(data.daily, data.timestamp);
    renderModels(data.by_model);
    renderIntents(data.by_intent);
  }

  // The priced cost is the main figure; the client's own estimate is shown under it,
  // with how far it is from the price over the calls both priced (client figure > 0).
  const SIGNED_PERCENT = numberFormat({ style: "percent", maximumFractionDigits: 0,
                                        signDisplay: "exceptZero" });

  function renderCost(cost) {
    const difference = $("#client-estimate-difference");
    const ratio = cost?.client_estimate_difference;
    const differs = ratio != null && Math.abs(ratio) >= 0.005;
    difference.hidden = !differs;
    difference.textContent = differs ? SIGNED_PERCENT.format(ratio) : "";
    difference.title = differs
      ? `client's figure ${cost.compared_client_estimate_usd} USD against the price ` +
        `${cost.compared_cost_usd} USD, over the calls with both` : "";
    difference.dataset.value = differs ? String(ratio) : "";
    const models = cost?.unpriced_models ?? [];
    const box = $("#unpriced");
    box.hidden = models.length === 0;
    const calls = Number(cost?.unpriced_messages ?? 0);
    $("#unpriced-count").textContent =
      `${INTEGER.format(calls)} ${calls === 1 ? "call of a model" : "calls of models"}`;
    $("#unpriced-models").replaceChildren(...models.map((m) => {
      const item = document.createElement("li");
      const name = document.createElement("code");
      name.textContent = m.model_name;
      item.append(name, ` — ${INTEGER.format(m.messages)} ${m.messages === 1 ? "call" : "calls"}`);
      item.dataset.model = m.model_name;
      return item;
    }));
  }

  // Every UTC day of the window, oldest first: the `days` days ending on the
  // service's today (the date of the answer's `timestamp`, not this browser's
  // clock), as /analytics counts them; each with its /analytics row, or none
  // for a day without messages.
  function windowDays(daily, timestamp) {
    const byDate = new Map(daily.map((row) => [row.date, row]));
    const today = Date.parse(`${timestamp.slice(0, 10)}T00:00:00Z`);
    const days = [];
    for (let i = state.days - 1; i >= 0; i -= 1) {
      const t = today - i * DAY_MS;
      const date = new Date(t).toISOString().slice(0, 10);
      days.push({ t: t / 1000, date, row: byDate.get(date) });
    }
    return days;
  }

  function renderDaily(daily, timestamp) {
    const hasP95 = daily.some((row) => "p95_response_time_ms" in row);
    const latencyKey = hasP95 ? "p95_response_time_ms" : "avg_response_time_ms";
    const latencyName = hasP95 ? "Reply time p95" : "Mean reply time";
    $("#latency-caption").textContent = latencyName;
    $("#latency-column").textContent = latencyName;
    const days = windowDays(daily, timestamp);
    const xs = days.map((d) => d.t);
    drawChart("chart-messages", "Messages", xs, days.map((d) => d.row?.messages ?? 0),
              { bars: true, kind: "count", color: "#2f6fb7" });
    drawChart("chart-cost", "Cost", xs,
              days.map((d) => Number(d.row?.cost_usd ?? d.row?.api_cost_usd ?? 0)),
              { bars: true, kind: "usd", color: "#8a5cc2" });
    drawChart("chart-latency", latencyName, xs,
              days.map((d) => (d.row ? Number(d.row[latencyKey]) : null)),
              { bars: false, kind: "ms", color: "#d0632a" });

    const body = $("#daily-table tbody");
    const rows = daily.slice().reverse().map((d) => {
      const row = headedRow(d.date);
      cell(row, d.messages, "count");
      cell(row, d.tokens, "count");
      cell(row, d.cost_usd ?? d.api_cost_usd, "usd");
      cell(row, d[latencyKey], "ms");
      return row;
    });
    body.replaceChildren(...rows);
    if (!rows.length) body.append(emptyRow(5, "No message in this window."));
  }

  function emptyRow(columns, text) {
    const row = document.createElement("tr");
    const td = row.insertCell();
    td.colSpan = columns;
    td.className = "muted";
    td.textContent = text;
    return row;
  }

  function axisValue(kind, v) {
    if (v === 0) return "0";
    if (kind === "usd") return `$${v < 0.01 ? v.toPrecision(2) : v.toFixed(2)}`;
    if (kind === "ms") return v >= 1000 ? `${v / 1000} s` : `${v} ms`;
    return INTEGER.format(v);
  }

  function drawChart(id, label, xs, ys, { bars, kind, color }) {
    const element = document.getElementById(id);
    state.charts[id]?.destroy();
    const series = {
      label, stroke: color, width: bars ? 0 : 2, fill: bars ? `${color}cc` : `${color}22`,
      value: (u, v) => (v == null ? "–" : FORMATS[kind].text(v)),
      points: { show: !bars, size: 6, fill: color },
      spanGaps: false,
    };
    if (bars) series.paths = uPlot.paths.bars({ size: [0.7, 28], gap: 1 });
    const grid = { stroke: "#e3e7ee", width: 1 };
    const axis = { stroke: "#5b6675", grid, ticks: { stroke: "#e3e7ee", width: 1 } };
    state.charts[id] = new uPlot({
      width: Math.max(200, element.clientWidth),
      height: 170,
      legend: { show: false }, // the table below gives every value
      cursor: { drag: { x: false, y: false } },
      scales: {
        // the window's days (not the data's extent, which uPlot widens when
        // there is one day), half a day either side so the end bars are whole
        x: { time: true, range: () => [xs[0] - 43200, xs[xs.length - 1] + 43200] },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
      },
      axes: [
        { ...axis, space: 60 },
        { ...axis, size: 64, values: (u, splits) => splits.map((v) => axisValue(kind, v)) },
      ],
      series: [{ label: "Day", value: (u, v) => (v == null ? "–" : new Date(v * 1000)
        .toISOString().slice(0, 10)) }, series],
    }, [xs, ys], element);
  }

  function resizeCharts() {
    for (const [id, chart] of Object.entries(state.charts)) {
      const width = Math.max(200, document.getElementById(id).clientWidth);
      chart.setSize({ width, height: 170 });
    }
  }

  function renderModels(byModel) {
    const body = $("#model-table tbody");
    const rows = byModel.slice().sort((a, b) => b.messages - a.messages).map((m) => {
      const row = headedRow(m.model_name);
      cell(row, m.messages, "count");
      cell(row, m.tokens, "count");
      costCell(row, m);
      cell(row, m.avg_response_time_ms, "ms");
      return row;
    });
    body.replaceChildren(...rows);
    if (!rows.length) body.append(emptyRow(5, "No message in this window."));
  }

  // A model's priced cost; "unpriced" (never $0) when none of its calls has a price.
  function costCell(row, m) {
    const unpriced = Number(m.unpriced_messages ?? 0);
    if (unpriced > 0 && unpriced === Number(m.messages)) {
      const td = cell(row, "unpriced");
      td.className = "num unpriced";
      td.title = "no price table knows this model; add it to PRICES_FILE";
      return td;
    }
    const td = cell(row, m.cost_usd ?? m.api_cost_usd, "usd");
    if (unpriced > 0) td.title += ` (${unpriced} unpriced calls left out)`;
    return td;
  }

  function renderIntents(byIntent) {
    const section = $("#intents");
    const present = Array.isArray(byIntent);
    section.dataset.present = String(present);
    $("#intents-missing").hidden = present;
    $("#intent-table").hidden = !present;
    if (!present) return;
    const total = byIntent.reduce((sum, i) => sum + Number(i.messages), 0);
    const rows = byIntent.slice().sort((a, b) => b.messages - a.messages).map((i) => {
      const row = headedRow(i.intent_detected);
      cell(row, i.messages, "count");
      const share = total ? i.messages / total : 0;
      const td = cell(row, share, "rate");
      const bar = document.createElement("span");
      bar.className = "share-bar";
      bar.style.width = `${(5 * share).toFixed(2)}rem`;
      td.prepend(bar);
      return row;
    });
    const body = $("#intent-table tbody");
    body.replaceChildren(...rows);
    if (!rows.length) body.append(emptyRow(3, "No message in this window."));
  }

  function renderCurl() {
    const needsKey = document.body.dataset.auth && document.body.dataset.auth !== "open";
    const event = {
      business_id: "my-first-business", session_id: "sess_first",
      response_time_ms: 850, success_rate: 1, tokens_used: 120, api_cost_usd: 0.00002,
      model_name: "gemini-1.5-flash", intent_detected: "general",
      appointment_requested: false, human_handoff_requested: false,
      user_message_length: 24, ai_response_length: 180, response_type: "text",
    };
    const body = JSON.stringify(event);
    $("#curl").textContent = [
      `curl -X POST ${window.location.origin}/track`,
      "-H 'Content-Type: application/json'",
      ...(needsKey ? ["-H \"X-API-Key: $MLOPS_API_KEY\""] : []),
      `-d '${body}'`,
    ].join(" \\\n  ");
  }

  // ---- Controls, key form, refresh schedule.
  function updateUrl() {
    const query = new URLSearchParams();
    if (state.businessId) query.set("business_id", state.businessId);
    if (state.days !== 30) query.set("days", String(state.days));
    const search = query.toString();
    window.history.replaceState(null, "", search ? `?${search}` : window.location.pathname);
  }

  function schedule() {
    clearInterval(state.timer);
    state.timer = document.hidden ? null : setInterval(refresh, REFRESH_MS);
    document.body.dataset.refresh = document.hidden ? "paused" : "running";
  }

  function start() {
    document.getElementById(`days-${state.days}`).checked = true;
    $("#business").addEventListener("change", (event) => {
      state.businessId = event.target.value || null;
      updateUrl();
      refresh();
    });
    $("#window").addEventListener("change", (event) => {
      state.days = Number(event.target.value);
      updateUrl();
      refresh();
    });
    $("#controls").addEventListener("submit", (event) => event.preventDefault());
    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("#api-key");
      sessionStorage.setItem(KEY_STORAGE, input.value);
      input.value = "";
      $("#key-form").hidden = true;
      refresh();
    });
    document.addEventListener("visibilitychange", () => {
      schedule();
      if (!document.hidden) refresh();
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(resizeCharts, 100);
    });
    schedule();
    refresh();
  }

  // The drawn uPlot charts by element id, for a console or a test to read.
  window.mlopsDashboard = Object.freeze({ charts: state.charts });
  start();
})();
