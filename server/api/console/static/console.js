// fmlora console: routing between the views, the key box, and the refresh loop.
//
// Polling stays cheap however long the history: each tick (1 s while a task is in progress or the
// Tasks view is open, 3 s otherwise) reads GET /info and the few tasks in progress (GET /tasks/{id});
// the full lists (GET /models, GET /tasks), whose evaluation cards grow with the number of tasks, are
// read again only when the live or served version moves, a task finishes, an action here changed
// something, or every 5 s (Tasks view) / 15 s (otherwise) to pick up tasks submitted elsewhere.
"use strict";

(() => {
  const FM = window.FM;
  const { $, api, key, notice, views } = FM;
  const VIEWS = ["versions", "tasks", "actions", "playground"];

  const st = {
    whoami: null,
    info: null,
    models: null,
    tasks: null,
    selected: null,
    view: "versions",
    seen: {},
    gen: 0,
    timer: null,
    pointer: null,
    fullAt: 0,
    forceFull: true,
    refresh: () => {
      st.forceFull = true;
      refreshSoon(0);
    },
  };

  // -- routing ---------------------------------------------------------------------------------
  function route() {
    const wanted = window.location.hash.replace(/^#/, "");
    st.view = VIEWS.includes(wanted) ? wanted : "versions";
    for (const name of VIEWS) $(`view-${name}`).hidden = name !== st.view;
    for (const a of document.querySelectorAll(".tabs a[data-view]")) a.classList.toggle("active", a.dataset.view === st.view);
    document.title = `fmlora console · ${st.view[0].toUpperCase()}${st.view.slice(1)}`;
    refreshSoon(0);
  }

  // -- who am I --------------------------------------------------------------------------------
  function renderRole() {
    const badge = $("role-badge");
    const who = st.whoami;
    const labels = { admin: "admin", reader: "read-only", anonymous: key.get() ? "checking…" : "no key" };
    badge.textContent = who ? labels[who.role] : "…";
    badge.className = `role ${who ? who.role : ""}`;
    badge.title = who
      ? { admin: "The admin key: read and manage.", reader: "The API key: read and predict; management is refused.", anonymous: "No key sent." }[who.role]
      : "";
    $("key-input").placeholder = key.get() ? "key set · type to replace" : "API or admin key";
    $("key-forget").hidden = !key.get();
  }

  async function checkKey() {
    try {
      st.whoami = await api("whoami");
    } catch (exc) {
      st.whoami = null;
      if (exc.status === 401 && key.get()) {
        key.clear();
        newGeneration();
        notice(`The server refused the key (${exc.message}); it was forgotten. Enter a valid API or admin key.`, "error");
        st.whoami = await api("whoami").catch(() => null);
      } else {
        notice(`Cannot reach the server: ${exc.describe ? exc.describe() : exc.message}`, "error");
      }
    }
    renderRole();
    st.seen = {}; // the key changed: read and redraw everything with what it may see
    st.forceFull = true;
  }

  // -- refresh ---------------------------------------------------------------------------------
  function changed(name, value) {
    const text = JSON.stringify(value);
    if (st.seen[name] === text) return false;
    st.seen[name] = text;
    return true;
  }

  function setStatus(ok, text) {
    $("server-status").className = `status ${ok ? "ok" : "bad"}`;
    $("server-status-text").textContent = text;
  }

  /** Re-read the tasks in progress; true when one of them finished (the full lists are then due). */
  async function followActiveTasks() {
    const active = (st.tasks || []).filter((t) => views.tasks.isActive(t));
    if (!active.length) return false;
    const fresh = await Promise.all(active.map((t) => api(`tasks/${encodeURIComponent(t.id)}`)));
    const byId = new Map(fresh.map((t) => [t.id, t]));
    st.tasks = st.tasks.map((t) => byId.get(t.id) || t);
    return fresh.some((t) => !views.tasks.isActive(t));
  }

  async function refresh() {
    const gen = st.gen;
    if (!st.whoami) await checkKey();
    const who = st.whoami;
    if (gen !== st.gen) return;
    if (!who) return setStatus(false, "unreachable");
    if (who.reads_need_key && who.role === "anonymous") {
      setStatus(false, "key needed");
      notice("This server needs a key to read: enter the API key (read-only) or the admin key at the top right.");
      rendered(gen);
      return;
    }
    let info;
    try {
      info = await api("info");
      const pointer = `${info.ready}/${info.live_version}/${info.serving_version}`;
      const fullEvery = st.view === "tasks" ? 5000 : 15000;
      let full = st.forceFull || !st.models || pointer !== st.pointer || Date.now() - st.fullAt > fullEvery;
      if (!full) full = await followActiveTasks();
      if (full) {
        const startedAt = Date.now();
        const [models, tasks] = await Promise.all([api("models"), api("tasks?limit=100")]);
        if (gen !== st.gen) return;
        Object.assign(st, { models, tasks: tasks.tasks, pointer, fullAt: startedAt, forceFull: false });
      }
    } catch (exc) {
      setStatus(false, exc.status === 503 ? "starting" : "error");
      notice(`Could not read the server's state: ${exc.describe ? exc.describe() : exc.message}`, "error");
      return;
    }
    if (gen !== st.gen) return;
    if (!$("notice").classList.contains("error") || $("notice").textContent.startsWith("Could not read")) notice(null);
    st.info = info;
    const { models } = st;
    const serving = info.serving_version ? `v${info.serving_version}` : "the bare backbone";
    setStatus(info.ready, info.ready ? `ready · serving ${serving}` : "loading the model");
    $("footer-info").textContent = `fmlora ${info.version} · ${info.backbone} on ${info.device} (${info.backend}) · ${info.labels} labels`;
    const modelsChanged = changed("models", [models, st.selected]);
    const tasksChanged = changed("tasks", st.tasks);
    const whoChanged = changed("whoami", who);
    if (modelsChanged || tasksChanged) views.versions.render(st);
    if (tasksChanged) views.tasks.render(st);
    if (modelsChanged || whoChanged) views.actions.render(st);
    if (whoChanged) views.actions.renderManagement(st);
    if (modelsChanged) views.playground.render(st);
    rendered(gen);
  }

  // Generations: each key change starts one; a refresh begun under an older key draws nothing. The
  // page says which generation it last drew (the browser tests wait for the current one).
  function newGeneration() {
    st.gen += 1;
    document.body.dataset.keyGeneration = String(st.gen);
  }

  function rendered(gen) {
    document.body.dataset.renderedGeneration = String(gen);
  }

  function refreshSoon(delay) {
    window.clearTimeout(st.timer);
    st.timer = window.setTimeout(loop, delay);
  }

  async function loop() {
    try {
      await refresh();
    } finally {
      const busy = st.view === "tasks" || views.tasks.active(st);
      // A hidden tab polls rarely: the console must not load the server for nobody.
      refreshSoon(document.hidden ? 15000 : busy ? 1000 : 3000);
    }
  }

  // -- start -----------------------------------------------------------------------------------
  function init() {
    $("key-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const value = $("key-input").value.trim();
      $("key-input").value = "";
      if (!value) return;
      key.set(value);
      notice(null);
      newGeneration();
      st.whoami = null;
      await checkKey();
      refreshSoon(0);
    });
    $("key-forget").addEventListener("click", async () => {
      key.clear();
      newGeneration();
      st.whoami = null;
      await checkKey();
      refreshSoon(0);
    });
    document.addEventListener("visibilitychange", () => !document.hidden && refreshSoon(0));
    window.addEventListener("hashchange", route);
    views.versions.init(st);
    views.tasks.init(st);
    views.playground.init(st);
    renderRole();
    newGeneration();
    route();
  }

  init();
})();
