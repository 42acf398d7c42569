// fmlora console: shared helpers (DOM building, formatting, the API client, the key).
// Loaded first; the other files add their views to window.FM.
"use strict";

(() => {
  const KEY_STORAGE = "fmlora.console.key";
  // The API root: the directory the console page is served from, so a proxy path prefix is kept.
  const BASE = new URL(".", window.location.href);

  /** Build an element: h("div", {class: "x", text: "..."}, child, ...). Styles go through the CSSOM
   *  (el.style), which the Content-Security-Policy allows, never through style attributes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "text") el.textContent = String(value);
      else if (name === "style") Object.assign(el.style, value);
      else if (name === "data") Object.assign(el.dataset, value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name in el && name !== "list") el[name] = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const $ = (id) => document.getElementById(id);

  function fill(id, ...children) {
    const el = typeof id === "string" ? $(id) : id;
    el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
    return el;
  }

  // -- formatting -------------------------------------------------------------------------------
  const isNum = (x) => typeof x === "number" && Number.isFinite(x);
  const pct = (x, digits = 1) => (isNum(x) ? `${(100 * x).toFixed(digits)}%` : "–");
  const signedPct = (x) => (isNum(x) ? `${x > 0 ? "+" : x < 0 ? "−" : "±"}${Math.abs(100 * x).toFixed(1)} pp` : "–");
  const int = (x) => (isNum(x) ? Math.round(x).toLocaleString("en-US") : "–");
  const bytes = (x) => (isNum(x) ? `${int(x)} B` : "–");
  const seconds = (x) => (isNum(x) ? (x < 10 ? `${x.toFixed(2)} s` : `${x.toFixed(0)} s`) : "–");
  const num = (x, digits = 3) => (isNum(x) ? x.toFixed(digits) : "–");
  const short = (sha) => (sha ? String(sha).slice(0, 12) : "–");

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  /** Sequential blue scale for accuracies in [0, 1]. */
  const STOPS = [
    [0.0, [244, 247, 251]],
    [0.25, [211, 224, 243]],
    [0.5, [157, 187, 230]],
    [0.75, [91, 139, 214]],
    [1.0, [31, 79, 180]],
  ];
  function heatColor(v) {
    const x = Math.max(0, Math.min(1, isNum(v) ? v : 0));
    for (let i = 1; i < STOPS.length; i++) {
      const [x1, c1] = STOPS[i];
      const [x0, c0] = STOPS[i - 1];
      if (x <= x1) {
        const t = (x - x0) / (x1 - x0);
        const c = c0.map((a, k) => Math.round(a + t * (c1[k] - a)));
        return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
      }
    }
    return "rgb(31, 79, 180)";
  }

  function badge(text, kind) {
    return h("span", { class: `badge ${kind || text}`, text });
  }

  /** Horizontal bars: rows of [name, value in [0, 1], label]. */
  function bars(rows, opts = {}) {
    if (!rows.length) return h("p", { class: "muted", text: opts.empty || "none" });
    return h(
      "div",
      { class: "bars" },
      rows.map(([name, value, label]) => [
        h("span", { class: "name", text: name, title: name }),
        h(
          "div",
          { class: "track" },
          h("div", { class: `fill${opts.bad ? " bad" : ""}`, style: { width: `${Math.max(0, Math.min(1, value || 0)) * 100}%` } }),
        ),
        h("span", { class: "num", text: label }),
      ]),
    );
  }

  // -- the key ----------------------------------------------------------------------------------
  // sessionStorage: the key lives as long as this tab, is never put in a URL, a cookie or a log.
  const key = {
    get: () => window.sessionStorage.getItem(KEY_STORAGE) || "",
    set: (value) => window.sessionStorage.setItem(KEY_STORAGE, value),
    clear: () => window.sessionStorage.removeItem(KEY_STORAGE),
  };

  // -- the API ----------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, type, message, requestId) {
      super(message);
      this.status = status;
      this.type = type;
      this.requestId = requestId;
    }
    describe() {
      const where = this.status ? `${this.status} ${this.type}` : this.type;
      const rid = this.requestId ? ` (request id ${this.requestId})` : "";
      return `${where}: ${this.message}${rid}`;
    }
  }

  /** Call the API with the key in the Authorization header; errors arrive as the server's envelope. */
  async function api(path, { method = "GET", body, headers } = {}) {
    const sent = new Headers(headers || {});
    const current = key.get();
    if (current) sent.set("Authorization", `Bearer ${current}`);
    let response;
    try {
      response = await fetch(new URL(path, BASE), { method, body, headers: sent, cache: "no-store", credentials: "omit" });
    } catch (exc) {
      throw new ApiError(0, "network_error", `the server did not answer (${exc.message})`, null);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(
        response.status,
        err.type || `http_${response.status}`,
        err.message || response.statusText || "request failed",
        err.request_id || response.headers.get("X-Request-ID"),
      );
    }
    return data;
  }

  function randomHex(bytesCount) {
    // getRandomValues works outside secure contexts too (plain http on a LAN host).
    const buf = new Uint8Array(bytesCount);
    window.crypto.getRandomValues(buf);
    return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function notice(message, kind) {
    const el = $("notice");
    if (!message) {
      el.hidden = true;
      el.textContent = "";
      return;
    }
    el.className = `notice${kind === "error" ? " error" : ""}`;
    el.textContent = message;
    el.hidden = false;
  }

  function result(id, message, ok) {
    const el = $(id);
    el.className = `result ${ok ? "ok" : "error"}`;
    el.textContent = message;
  }

  window.FM = {
    h, $, fill, pct, signedPct, int, bytes, seconds, num, short, when, heatColor, badge, bars,
    key, api, ApiError, randomHex, notice, result, isNum,
    views: {},
  };
})();
