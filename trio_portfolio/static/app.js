// Portfolio dashboard: one v2 session over one WebSocket, no build step, no dependencies.
//
// Flow: POST /session (or reuse the id in the URL fragment) -> ws://host/ws/{id} with the
// "portfolio.v2" subprotocol -> render every server event. With authentication on, POST
// /session also returns the session's credential: it is kept in the fragment (never sent to
// a server in a URL) and presented as a second subprotocol "portfolio.auth.<credential>".
// POST /session's config says whether to reconnect after a drop and after how long without
// user activity to let the socket go (it comes back on the next click or key). The server is the source of
// truth: the page keeps a small model (portfolio, analyses, value series) that only server
// frames change, and re-renders from it. All text goes through textContent, never HTML.

const SUBPROTOCOL = "portfolio.v2";
const AUTH_PREFIX = "portfolio.auth.";
const CREDENTIAL_RE = /^[A-Za-z0-9_-]{1,256}$/;
const CONFIG_KEY = "portfolio.client-config";
const METRICS = ["portfolio_risk", "concentration", "correlation", "momentum", "allocation_score"];
const METRIC_LABELS = {
  portfolio_risk: "Portfolio risk",
  concentration: "Concentration",
  correlation: "Correlation",
  momentum: "Momentum",
  allocation_score: "Allocation score",
};
const REASONS = {
  switched: "cancelled: switched",
  cancelled: "cancelled",
  portfolio_changed: "restarted: portfolio changed",
  disconnected: "interrupted: connection lost",
};
const SESSION_RE = /^[A-Za-z0-9_-]{1,64}$/;
const TICKER_RE = /^[A-Z][A-Z0-9.-]{0,9}$/;
const MAX_ANALYSES = 12;
const MAX_POINTS = 180;
const MAX_ERRORS = 5;
const MAX_LOG = 60;

const money = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
const quantity = new Intl.NumberFormat("en-US", { maximumFractionDigits: 6 });
const percent = new Intl.NumberFormat("en-US", { style: "percent", maximumFractionDigits: 1 });
const clock = new Intl.DateTimeFormat("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" });

const $ = (id) => document.getElementById(id);

const state = {
  sessionId: null,
  credential: null,
  config: loadConfig(), // {idleTimeoutSeconds, autoReconnect}, from POST /session
  lastActivity: Date.now(),
  idle: false,
  ws: null,
  retryDelay: 500,
  portfolio: null, // {holdings, prices, total_value, portfolio_version}
  analyses: new Map(), // analysis_id -> {id, ticker, status, reason, switchedTo, results, startedAt}
  order: [], // analysis ids, newest first
  currentId: null,
  requestedTicker: null, // asked for, no analysis_started yet
  series: [], // [{t: Date, v: number}]
  editing: false,
  saving: false,
};

// -- small DOM helpers --------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function announce(text) {
  $("announce").textContent = text;
}

function logFrame(direction, frame) {
  const list = $("log");
  const summary = typeof frame === "string" ? frame : JSON.stringify(frame);
  list.prepend(el("li", { text: `${clock.format(new Date())} ${direction} ${summary.slice(0, 300)}` }));
  while (list.children.length > MAX_LOG) list.lastElementChild.remove();
}

// -- errors ---------------------------------------------------------------------------------

function showError(code, detail) {
  const list = $("errors");
  const item = el(
    "li",
    { class: "error", "data-code": code },
    el("span", { class: "code", text: code }),
    el("span", { class: "detail", text: detail }),
    el("time", { text: clock.format(new Date()) }),
    el("button", {
      type: "button",
      "aria-label": `Dismiss error ${code}`,
      text: "×",
      onclick: () => item.remove(),
    }),
  );
  list.prepend(item);
  while (list.children.length > MAX_ERRORS) list.lastElementChild.remove();
}

// -- session and socket ---------------------------------------------------------------------

function fragmentValue(name, pattern) {
  const match = new RegExp(`(?:^#|&)${name}=([^&]+)`).exec(location.hash);
  const value = match ? decodeURIComponent(match[1]) : null;
  return value && pattern.test(value) ? value : null;
}

function sessionFromFragment() {
  return fragmentValue("session", SESSION_RE);
}

function rememberSession(id) {
  state.sessionId = id;
  $("session-id").textContent = id;
  let fragment = `#session=${encodeURIComponent(id)}`;
  if (state.credential) fragment += `&credential=${encodeURIComponent(state.credential)}`;
  history.replaceState(null, "", fragment);
}

function loadConfig() {
  const fallback = { idleTimeoutSeconds: 0, autoReconnect: true };
  try {
    return { ...fallback, ...JSON.parse(sessionStorage.getItem(CONFIG_KEY) || "{}") };
  } catch {
    return fallback;
  }
}

function applyConfig(config) {
  // The shape the original service's page reads (see POST /session in the protocol).
  const connectivity = config?.features?.["client-connectivity"]?.settings ?? {};
  const idle = connectivity["idle-timeout-seconds"];
  const reconnect = connectivity["auto-reconnect"];
  state.config = {
    idleTimeoutSeconds: typeof idle === "number" && idle >= 0 ? idle : 0,
    autoReconnect: typeof reconnect === "boolean" ? reconnect : true,
  };
  try {
    sessionStorage.setItem(CONFIG_KEY, JSON.stringify(state.config));
  } catch {
    // storage may be unavailable (private mode): the config then lasts for this page only
  }
}

async function createSession() {
  const response = await fetch("/session", { method: "POST", headers: { accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok || typeof body.session_id !== "string") {
    throw new Error(body.detail || body.reason || `POST /session answered ${response.status}`);
  }
  if (body.config && typeof body.config === "object") applyConfig(body.config);
  state.credential = typeof body.credential === "string" ? body.credential : null;
  if (body.portfolio && typeof body.portfolio === "object") applyPortfolio(body.portfolio);
  return body.session_id;
}

function setConnection(stateName, text) {
  const pill = $("connection");
  pill.dataset.state = stateName;
  pill.textContent = text;
  const open = stateName === "open";
  $("edit-holdings").disabled = !open || !state.portfolio;
  $("save-holdings").disabled = !open;
  renderHoldings();
  renderAnalyses();
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/ws/${encodeURIComponent(state.sessionId)}`;
  setConnection("connecting", "Connecting…");
  const protocols = [SUBPROTOCOL];
  if (state.credential) protocols.push(AUTH_PREFIX + state.credential);
  state.idle = false;
  state.lastActivity = Date.now();
  const ws = new WebSocket(url, protocols);
  state.ws = ws;
  ws.addEventListener("open", () => {
    if (ws.protocol !== SUBPROTOCOL) {
      showError("protocol", `the server did not accept ${SUBPROTOCOL}; this page needs it`);
      ws.close(1000, "wrong protocol");
      return;
    }
    state.retryDelay = 500;
    setConnection("open", "Connected");
  });
  ws.addEventListener("message", (message) => {
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch {
      showError("bad_frame", "the server sent a frame that is not JSON");
      return;
    }
    logFrame("←", frame);
    handleFrame(frame);
  });
  ws.addEventListener("close", (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    interruptRunning();
    const why = event.reason ? ` (${event.code} ${event.reason})` : ` (${event.code})`;
    if (state.idle) {
      setConnection("idle", "Idle: disconnected; click or press a key to reconnect");
      return;
    }
    if (!state.config.autoReconnect) {
      setConnection("closed", `Disconnected${why}; reload to reconnect`);
      return;
    }
    const delay = state.retryDelay;
    state.retryDelay = Math.min(delay * 2, 10000);
    setConnection("closed", `Disconnected${why}; retrying in ${Math.round(delay / 1000) || 1} s`);
    setTimeout(connect, delay);
  });
}

// After config.idleTimeoutSeconds without a click or key press the socket is let go (the
// server keeps the session); the next activity reconnects.
function noteActivity() {
  state.lastActivity = Date.now();
  if (state.idle && state.ws === null && state.sessionId) connect();
}

function checkIdle() {
  const limit = state.config.idleTimeoutSeconds;
  if (!limit || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  if (Date.now() - state.lastActivity >= limit * 1000) {
    state.idle = true;
    state.ws.close(1000, "idle");
  }
}

function send(message) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    showError("not_connected", "not connected to the server; your action was not sent");
    return false;
  }
  state.ws.send(JSON.stringify(message));
  logFrame("→", message);
  return true;
}

// -- server frames --------------------------------------------------------------------------

function handleFrame(frame) {
  switch (frame.type) {
    case "session":
      if (frame.session_id !== state.sessionId) rememberSession(frame.session_id);
      applyPortfolio(frame.portfolio, { restoreResults: state.analyses.size === 0 });
      break;
    case "portfolio":
      applyPortfolio(frame);
      if (state.saving) finishEditing();
      break;
    case "analysis_started":
      onStarted(frame);
      break;
    case "analysis_result":
      onResult(frame);
      break;
    case "analysis_complete":
      onFinished(frame.analysis_id, "complete", null);
      break;
    case "analysis_cancelled":
      onFinished(frame.analysis_id, "cancelled", frame.reason);
      break;
    case "market_update":
      onMarketUpdate(frame);
      break;
    case "error":
      onError(frame);
      break;
    default:
      break; // newer servers may send more; ignore what we do not know
  }
}

function applyPortfolio(portfolio, { restoreResults = false } = {}) {
  const previous = state.portfolio;
  state.portfolio = {
    holdings: portfolio.holdings || {},
    prices: portfolio.prices || (previous ? previous.prices : {}),
    total_value: portfolio.total_value,
    portfolio_version: portfolio.portfolio_version,
  };
  addPoint(portfolio.total_value, new Date());
  if (restoreResults && Array.isArray(portfolio.analysis_results)) restoreAnalyses(portfolio);
  $("edit-holdings").disabled = !(state.ws && state.ws.readyState === WebSocket.OPEN);
  renderHoldings();
  renderAnalyses();
}

function restoreAnalyses(portfolio) {
  // Results stored by earlier visits, grouped per analysis, newest last on the wire.
  const current = portfolio.current_analysis ? portfolio.current_analysis.analysis_id : null;
  for (const result of portfolio.analysis_results) {
    let analysis = state.analyses.get(result.analysis_id);
    if (!analysis) {
      analysis = newAnalysis(result.analysis_id, result.ticker, new Date(result.timestamp));
      analysis.status = "restored";
    }
    analysis.results[result.metric] = result.value;
  }
  for (const analysis of state.analyses.values()) {
    const done = Object.keys(analysis.results).length === METRICS.length;
    analysis.status = done ? "complete" : analysis.id === current ? "interrupted" : "cancelled";
    if (!done) analysis.reason = analysis.id === current ? "disconnected" : "cancelled";
  }
  state.order.sort((a, b) => state.analyses.get(b).startedAt - state.analyses.get(a).startedAt);
  trimAnalyses();
}

function newAnalysis(id, ticker, startedAt) {
  const analysis = { id, ticker, status: "running", reason: null, switchedTo: null, results: {}, startedAt };
  state.analyses.set(id, analysis);
  state.order.unshift(id);
  trimAnalyses();
  return analysis;
}

function trimAnalyses() {
  while (state.order.length > MAX_ANALYSES) state.analyses.delete(state.order.pop());
}

function onStarted(frame) {
  const analysis = newAnalysis(frame.analysis_id, frame.ticker, new Date(frame.started_at || Date.now()));
  analysis.version = frame.portfolio_version;
  state.currentId = frame.analysis_id;
  if (state.requestedTicker === frame.ticker) state.requestedTicker = null;
  announce(`Analysing ${frame.ticker}: 0 of 5 metrics`);
  renderAnalyses();
  renderHoldings();
}

function onResult(frame) {
  let analysis = state.analyses.get(frame.analysis_id);
  if (!analysis) analysis = newAnalysis(frame.analysis_id, frame.ticker, new Date(frame.timestamp));
  analysis.results[frame.metric] = frame.value;
  const count = Object.keys(analysis.results).length;
  if (count === METRICS.length) announce(`${analysis.ticker}: all 5 metrics received`);
  renderAnalyses();
}

function onFinished(id, status, reason) {
  const analysis = state.analyses.get(id);
  if (!analysis) return;
  analysis.status = status;
  analysis.reason = reason;
  if (reason === "switched") analysis.switchedTo = state.requestedTicker;
  if (state.currentId === id) state.currentId = null;
  const label = status === "complete" ? "complete" : REASONS[reason] || "cancelled";
  announce(`${analysis.ticker} analysis ${label}`);
  renderAnalyses();
  renderHoldings();
}

function interruptRunning() {
  for (const analysis of state.analyses.values()) {
    if (analysis.status === "running") {
      analysis.status = "interrupted";
      analysis.reason = "disconnected";
    }
  }
  state.currentId = null;
  state.requestedTicker = null;
}

function onMarketUpdate(frame) {
  if (!state.portfolio) return;
  if (frame.portfolio_version < state.portfolio.portfolio_version) return;
  state.portfolio.prices = { ...state.portfolio.prices, ...frame.prices };
  state.portfolio.total_value = frame.total_value;
  state.portfolio.portfolio_version = frame.portfolio_version;
  addPoint(frame.total_value, new Date(frame.as_of || Date.now()));
  renderHoldings();
}

function onError(frame) {
  showError(frame.code || "error", frame.detail || "the server reported an error");
  if (["bad_ticker", "ticker_not_held", "unsupported_in_v1"].includes(frame.code)) {
    state.requestedTicker = null;
    renderHoldings();
  }
  if (state.saving && frame.code === "bad_holdings") {
    state.saving = false;
    $("edit-error").textContent = frame.detail;
    $("save-holdings").disabled = false;
  }
}

// -- actions ----------------------------------------------------------------------------------

function analyse(ticker) {
  if (send({ action: "analyze", ticker })) {
    state.requestedTicker = ticker;
    renderHoldings();
  }
}

function cancelAnalysis() {
  send({ action: "cancel" });
}

// -- holdings table ---------------------------------------------------------------------------

function runningTicker() {
  const current = state.currentId ? state.analyses.get(state.currentId) : null;
  return state.requestedTicker || (current && current.status === "running" ? current.ticker : null);
}

function renderHoldings() {
  const body = $("holdings-body");
  const portfolio = state.portfolio;
  if (!portfolio) return;
  const open = Boolean(state.ws && state.ws.readyState === WebSocket.OPEN);
  const busy = runningTicker();
  body.replaceChildren();
  const tickers = Object.keys(portfolio.holdings).sort();
  for (const ticker of tickers) {
    const qty = portfolio.holdings[ticker];
    const price = portfolio.prices[ticker];
    const value = typeof price === "number" ? qty * price : null;
    const weight = value !== null && portfolio.total_value > 0 ? value / portfolio.total_value : null;
    const row = el(
      "tr",
      { "data-ticker": ticker, "data-analysing": busy === ticker ? "true" : null },
      el("th", { scope: "row", text: ticker }),
      el("td", { class: "num", text: quantity.format(qty) }),
      el("td", { class: "num", text: price === undefined ? "—" : money.format(price) }),
      el("td", { class: "num", text: value === null ? "—" : money.format(value) }),
      el("td", { class: "num", text: weight === null ? "—" : percent.format(weight) }),
      el(
        "td",
        {},
        el("button", {
          type: "button",
          class: "analyze",
          "data-ticker": ticker,
          "aria-label": `Analyse ${ticker}`,
          disabled: !open,
          text: busy === ticker ? "Analysing…" : "Analyse",
          onclick: () => analyse(ticker),
        }),
      ),
    );
    body.append(row);
  }
  $("total-value").textContent = money.format(portfolio.total_value);
  $("holdings-caption").textContent =
    `${tickers.length} holding${tickers.length === 1 ? "" : "s"} · portfolio version ${portfolio.portfolio_version}`;
  $("cancel-analysis").disabled = !open || !busy;
}

// -- analyses ---------------------------------------------------------------------------------

function statusText(analysis) {
  const count = Object.keys(analysis.results).length;
  if (analysis.status === "running") return `Computing ${count}/5`;
  if (analysis.status === "complete") return "Complete";
  const base = REASONS[analysis.reason] || "cancelled";
  const text = base.charAt(0).toUpperCase() + base.slice(1);
  return analysis.switchedTo ? `${text} to ${analysis.switchedTo}` : text;
}

function renderAnalysis(analysis, index) {
  const count = Object.keys(analysis.results).length;
  const badgeStatus = analysis.status === "interrupted" ? "interrupted" : analysis.status;
  const badge = el(
    "span",
    { class: "badge", "data-status": badgeStatus },
    analysis.status === "running" ? el("span", { class: "spinner", "aria-hidden": "true" }) : null,
    el("span", { class: "status-text", text: statusText(analysis) }),
  );
  const metrics = el("dl", { class: "metric-values" });
  for (const metric of METRICS) {
    const has = metric in analysis.results;
    metrics.append(
      el(
        "div",
        { "data-metric": metric },
        el("dt", { text: METRIC_LABELS[metric] }),
        el("dd", { "data-pending": has ? null : "true", text: has ? analysis.results[metric].toFixed(4) : "…" }),
      ),
    );
  }
  const progress = el(
    "div",
    { class: "progress-row" },
    el("progress", {
      max: METRICS.length,
      value: count,
      "aria-label": `${analysis.ticker}: ${count} of 5 metrics`,
    }),
    el("span", { class: "progress-count", "aria-hidden": "true", text: `${count}/5` }),
  );
  return el(
    "li",
    {
      class: `analysis${index === 0 ? "" : " older"}`,
      "data-analysis-id": analysis.id,
      "data-ticker": analysis.ticker,
      "data-status": analysis.status,
      "data-reason": analysis.reason,
      "data-results": count,
    },
    el(
      "div",
      { class: "analysis-head" },
      el("span", { class: "ticker", text: analysis.ticker }),
      badge,
      el("span", { class: "summary", text: index === 0 ? null : `${count}/5 metrics` }),
      el("time", { class: "when", datetime: analysis.startedAt.toISOString(), text: clock.format(analysis.startedAt) }),
    ),
    progress,
    metrics,
  );
}

function renderAnalyses() {
  const list = $("analyses");
  list.replaceChildren(...state.order.map((id, index) => renderAnalysis(state.analyses.get(id), index)));
  $("analysis-empty").hidden = state.order.length > 0;
}

// -- chart --------------------------------------------------------------------------------------

function addPoint(value, when) {
  if (typeof value !== "number" || !Number.isFinite(value)) return;
  const last = state.series[state.series.length - 1];
  if (last && last.v === value && when - last.t < 1000) return;
  state.series.push({ t: when, v: value });
  if (state.series.length > MAX_POINTS) state.series.shift();
  renderChart();
}

function renderChart() {
  const chart = $("chart");
  const title = $("chart-title");
  const points = state.series;
  // Drawn in CSS pixels at the chart's current width, so labels keep their size.
  const width = Math.max(320, Math.round(chart.getBoundingClientRect().width) || 640);
  const height = 220;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const pad = { left: 78, right: 14, top: 12, bottom: 26 };
  chart.replaceChildren(title);
  if (points.length < 2) {
    title.textContent = "Total value over time: waiting for market updates";
    chart.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "Waiting for market updates…"));
    return;
  }
  let lo = Math.min(...points.map((p) => p.v));
  let hi = Math.max(...points.map((p) => p.v));
  if (hi - lo < 1e-9) {
    lo -= 1;
    hi += 1;
  }
  const margin = (hi - lo) * 0.08;
  lo -= margin;
  hi += margin;
  const t0 = points[0].t.getTime();
  const t1 = points[points.length - 1].t.getTime();
  const span = Math.max(t1 - t0, 1);
  const x = (p) => pad.left + ((p.t.getTime() - t0) / span) * (width - pad.left - pad.right);
  const y = (v) => pad.top + (1 - (v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  for (let i = 0; i <= 3; i++) {
    const v = lo + ((hi - lo) * i) / 3;
    chart.append(svg("line", { class: "grid-line", x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }));
    chart.append(svg("text", { class: "axis-label", x: pad.left - 6, y: y(v) + 4, "text-anchor": "end" }, money.format(v)));
  }
  const coords = points.map((p) => `${x(p).toFixed(1)},${y(p.v).toFixed(1)}`);
  const base = height - pad.bottom;
  chart.append(svg("polygon", { class: "area", points: `${pad.left},${base} ${coords.join(" ")} ${x(points[points.length - 1]).toFixed(1)},${base}` }));
  chart.append(svg("polyline", { class: "line", points: coords.join(" ") }));
  const lastPoint = points[points.length - 1];
  chart.append(svg("circle", { class: "dot", cx: x(lastPoint), cy: y(lastPoint.v), r: 3.5 }));
  chart.append(svg("text", { class: "axis-label", x: pad.left, y: height - 6 }, clock.format(points[0].t)));
  chart.append(svg("text", { class: "axis-label", x: width - pad.right, y: height - 6, "text-anchor": "end" }, clock.format(lastPoint.t)));
  const first = points[0].v;
  const change = first ? (lastPoint.v - first) / first : 0;
  const summary = `${money.format(lastPoint.v)} (${change >= 0 ? "+" : ""}${percent.format(change)} over ${points.length} points)`;
  $("chart-summary").textContent = summary;
  title.textContent = `Total value over time: now ${summary}`;
}

// -- editing holdings ---------------------------------------------------------------------------

function editRow(ticker = "", qty = "") {
  const row = el("div", { class: "edit-row" });
  const tickerInput = el("input", {
    name: "ticker",
    value: ticker,
    autocomplete: "off",
    spellcheck: "false",
    maxlength: 10,
    required: true,
    "aria-describedby": "edit-error",
  });
  const qtyInput = el("input", {
    name: "quantity",
    type: "number",
    inputmode: "decimal",
    min: "0",
    step: "any",
    value: qty,
    required: true,
    "aria-describedby": "edit-error",
  });
  row.append(
    el("label", {}, el("span", { class: "label-text", "data-label": "Ticker" }), tickerInput),
    el("label", {}, el("span", { class: "label-text", "data-label": "Quantity" }), qtyInput),
    el("button", {
      type: "button",
      class: "secondary remove",
      text: "Remove",
      onclick: () => {
        row.remove();
        if (!document.querySelector(".edit-row")) $("edit-rows").append(editRow());
        numberRows();
      },
    }),
  );
  return row;
}

function numberRows() {
  // Labels name the row by position ("Ticker 2"), so they are renumbered after a removal.
  document.querySelectorAll(".edit-row").forEach((row, index) => {
    for (const span of row.querySelectorAll(".label-text")) span.textContent = `${span.dataset.label} ${index + 1}`;
    row.querySelector(".remove").setAttribute("aria-label", `Remove row ${index + 1}`);
  });
}

function startEditing() {
  if (!state.portfolio) return;
  state.editing = true;
  const rows = $("edit-rows");
  rows.replaceChildren();
  for (const ticker of Object.keys(state.portfolio.holdings).sort()) {
    rows.append(editRow(ticker, String(state.portfolio.holdings[ticker])));
  }
  numberRows();
  $("edit-error").textContent = "";
  $("edit-form").hidden = false;
  $("edit-holdings").setAttribute("aria-expanded", "true");
  rows.querySelector("input").focus();
}

function finishEditing() {
  state.editing = false;
  state.saving = false;
  $("edit-form").hidden = true;
  $("edit-holdings").setAttribute("aria-expanded", "false");
  $("save-holdings").disabled = false;
  $("edit-holdings").focus();
}

function collectHoldings() {
  const holdings = {};
  let problem = null;
  for (const row of document.querySelectorAll(".edit-row")) {
    const tickerInput = row.querySelector('input[name="ticker"]');
    const qtyInput = row.querySelector('input[name="quantity"]');
    const ticker = tickerInput.value.trim().toUpperCase();
    const qty = Number(qtyInput.value);
    tickerInput.removeAttribute("aria-invalid");
    qtyInput.removeAttribute("aria-invalid");
    if (!ticker && !qtyInput.value.trim()) continue;
    if (!TICKER_RE.test(ticker)) {
      tickerInput.setAttribute("aria-invalid", "true");
      problem = problem || `“${tickerInput.value}” is not a ticker`;
    } else if (ticker in holdings) {
      tickerInput.setAttribute("aria-invalid", "true");
      problem = problem || `${ticker} is listed twice`;
    }
    if (!(Number.isFinite(qty) && qty > 0 && qty <= 1e12)) {
      qtyInput.setAttribute("aria-invalid", "true");
      problem = problem || `the quantity of ${ticker || "a row"} must be a positive number`;
    }
    holdings[ticker] = qty;
  }
  const count = Object.keys(holdings).length;
  if (!problem && (count < 1 || count > 100)) problem = "keep between 1 and 100 holdings";
  return { holdings, problem };
}

function saveHoldings(event) {
  event.preventDefault();
  const { holdings, problem } = collectHoldings();
  if (problem) {
    $("edit-error").textContent = problem;
    const invalid = document.querySelector('.edit-row [aria-invalid="true"]');
    if (invalid) invalid.focus();
    return;
  }
  $("edit-error").textContent = "";
  if (send({ action: "set_holdings", holdings })) {
    state.saving = true;
    $("save-holdings").disabled = true;
  }
}

// -- start ------------------------------------------------------------------------------------

function wire() {
  new ResizeObserver(() => renderChart()).observe($("chart"));
  $("edit-holdings").setAttribute("aria-expanded", "false");
  $("edit-holdings").setAttribute("aria-controls", "edit-form");
  $("edit-holdings").addEventListener("click", () => (state.editing ? finishEditing() : startEditing()));
  $("add-row").addEventListener("click", () => {
    const row = editRow();
    $("edit-rows").append(row);
    numberRows();
    row.querySelector("input").focus();
  });
  $("cancel-edit").addEventListener("click", finishEditing);
  $("edit-form").addEventListener("submit", saveHoldings);
  $("cancel-analysis").addEventListener("click", cancelAnalysis);
  for (const kind of ["pointerdown", "keydown"]) addEventListener(kind, noteActivity, { capture: true });
  setInterval(checkIdle, 1000);
}

async function main() {
  wire();
  renderChart();
  let id = sessionFromFragment();
  if (id) state.credential = fragmentValue("credential", CREDENTIAL_RE);
  if (!id) {
    try {
      id = await createSession();
    } catch (error) {
      setConnection("closed", "No session");
      showError("session_unavailable", `could not create a session: ${error.message}; reload to retry`);
      return;
    }
  }
  rememberSession(id);
  connect();
}

main();
