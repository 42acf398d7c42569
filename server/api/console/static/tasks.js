// Tasks view (queue, history with live progress, upload) and Actions view (activate / roll back).
// Management calls go to the same routes as any client, with the key from the page; the server
// decides, and its answer (success or the error envelope's message) is shown as it is.
"use strict";

(() => {
  const { h, $, fill, pct, int, when, badge, api, randomHex, result, isNum } = window.FM;

  const ACTIVE = ["queued", "training", "evaluating"];

  function progressCell(t) {
    const p = t.progress || {};
    if (t.status === "queued") return h("span", { class: "muted", text: "waiting for the worker" });
    if (t.status === "training" && isNum(p.epoch)) {
      const done = isNum(p.step) && isNum(p.steps) && p.steps > 0 ? p.step / p.steps : 0;
      return h(
        "div",
        { class: "progress" },
        h("div", { text: `epoch ${p.epoch}/${p.epochs} · step ${p.step}/${p.steps}` }),
        h("div", { class: "muted", text: isNum(p.loss) ? `loss ${p.loss.toFixed(3)}` : "" }),
        h("div", { class: "track" }, h("div", { class: "fill", style: { width: `${Math.round(100 * done)}%` } })),
      );
    }
    if (t.status === "training") return h("span", { class: "muted", text: "starting…" });
    if (t.status === "evaluating") return h("span", { text: "evaluating every task seen so far…" });
    if (isNum(p.epochs))
      return h(
        "div",
        { class: "progress" },
        h("div", { text: `${p.epochs} epochs${isNum(p.loss) ? ` · loss ${p.loss.toFixed(3)}` : ""}` }),
        h("div", { class: "track" }, h("div", { class: "fill done", style: { width: "100%" } })),
      );
    return h("span", { class: "muted", text: "–" });
  }

  function outcomeCell(t) {
    const m = t.metrics || {};
    if (t.status === "failed") return h("div", { class: "error-text", text: t.error || "failed" });
    if (t.status === "rejected") {
      const reasons = (m.gate && m.gate.reasons && m.gate.reasons.length ? m.gate.reasons : [t.error || "rejected by the promotion gate"]).join("; ");
      return h("div", { class: "error-text", text: `gate: ${reasons}` });
    }
    if (isNum(m.new_task_accuracy)) return h("div", { text: `new task ${pct(m.new_task_accuracy)} · all ${pct(m.final_accuracy)}` });
    if (t.error && ACTIVE.includes(t.status)) return h("div", { class: "muted", text: `retrying: ${t.error}` });
    return h("span", { class: "muted", text: "–" });
  }

  function renderTasks(st) {
    const tasks = st.tasks || [];
    const active = tasks.filter((t) => ACTIVE.includes(t.status)).length;
    fill("tasks-hint", `${tasks.length} task${tasks.length === 1 ? "" : "s"}${active ? ` · ${active} in progress` : ""} · newest first · refreshed every second`);
    if (!tasks.length) return fill("tasks-table", h("p", { class: "muted", text: "No task submitted yet." }));
    const head = h("tr", {}, ["task", "kind", "status", "progress", "version", "outcome", "classes", "images", "submitted"].map((t) => h("th", { text: t })));
    const rows = tasks.map((t) =>
      h(
        "tr",
        { data: { task: t.name, status: t.status } },
        h("td", {}, h("div", { text: t.name }), h("div", { class: "muted mono", text: t.id })),
        h("td", { text: t.kind }),
        h("td", {}, badge(t.status), t.attempts > 1 ? h("div", { class: "muted", text: `attempt ${t.attempts}` }) : null),
        h("td", {}, progressCell(t)),
        h("td", { text: isNum(t.version) ? `v${t.version}` : "–" }),
        h("td", { class: "outcome" }, outcomeCell(t)),
        h("td", { title: (t.classes || []).join(", "), text: classSummary(t.classes || []) }),
        h("td", { class: "num", text: `${int(t.num_train)} + ${int(t.num_eval)}`, title: "training + held-out images" }),
        h("td", { class: "mono", text: when(t.created_at) }),
      ),
    );
    fill("tasks-table", h("table", { class: "list", id: "tasks-list" }, h("thead", {}, head), h("tbody", {}, rows)));
  }

  function classSummary(classes) {
    const shown = classes.slice(0, 4).join(", ");
    return classes.length > 4 ? `${shown} … (${classes.length})` : shown || "–";
  }

  async function upload(st, event) {
    event.preventDefault();
    const file = $("upload-file").files[0];
    const name = $("upload-name").value.trim();
    if (!file) return result("upload-result", "Choose an archive first.", false);
    if (!name) return result("upload-result", "Give the task a name.", false);
    const form = new FormData();
    form.append("archive", file, file.name);
    form.append("name", name);
    form.append("kind", $("upload-kind").value);
    $("upload-submit").disabled = true;
    result("upload-result", `Uploading ${file.name} (${int(file.size)} bytes)…`, true);
    try {
      // A fresh idempotency key per click: a retried request cannot create the task twice.
      const accepted = await api("tasks", { method: "POST", body: form, headers: { "Idempotency-Key": `console-${randomHex(16)}` } });
      result("upload-result", `Task ${name} ${accepted.status} as ${accepted.id}; follow it below.`, true);
      $("upload-form").reset();
      st.refresh();
    } catch (exc) {
      result("upload-result", `Refused: ${exc.describe ? exc.describe() : exc.message}${hintFor(exc)}`, false);
    } finally {
      $("upload-submit").disabled = false;
    }
  }

  function hintFor(exc) {
    if (exc.status === 401) return " — enter the admin key at the top of the page.";
    if (exc.status === 403 && exc.type === "forbidden") return " — the key in use is read-only; enter the admin key.";
    return "";
  }

  // -- actions ---------------------------------------------------------------------------------
  const MANAGEMENT_OFF = "Management is disabled on this server: no admin key is configured (FMLORA_ADMIN_KEY), so versions cannot be activated and tasks cannot be submitted here.";

  function actionButton(st, v) {
    const live = st.models.live;
    if (v.version === live) return badge("live");
    if (v.state === "rejected") return h("span", { class: "muted", text: "rejected by the gate: cannot go live" });
    const verb = !isNum(live) ? "Activate" : v.version < live ? "Roll back to" : "Roll forward to";
    const label = `${verb} v${v.version}`;
    // Two clicks: the first asks for confirmation (for 5 s), the second calls the API. The armed
    // state lives in `st`, so a redraw while the operator hesitates keeps it.
    const armed = st.armed && st.armed.version === v.version;
    return h("button", {
      type: "button",
      class: armed ? "" : "secondary",
      text: armed ? `Confirm: ${label}` : label,
      data: { activate: String(v.version) },
      onclick: (event) => {
        if (!(st.armed && st.armed.version === v.version)) {
          window.clearTimeout(st.armed && st.armed.timer);
          const timer = window.setTimeout(() => {
            st.armed = null;
            renderActions(st);
          }, 5000);
          st.armed = { version: v.version, timer };
          renderActions(st);
          return;
        }
        window.clearTimeout(st.armed.timer);
        st.armed = null;
        activate(st, v.version, event.currentTarget);
      },
    });
  }

  async function activate(st, version, button) {
    button.disabled = true;
    result("actions-result", `Activating v${version}…`, true);
    try {
      const answer = await api(`models/${version}/activate`, { method: "POST" });
      const text = answer.warning ? `v${answer.live} is live. ${answer.warning}` : `v${answer.live} is live; this replica serves v${answer.serving}.`;
      result("actions-result", text, !answer.warning);
      st.refresh();
    } catch (exc) {
      result("actions-result", `Refused: ${exc.describe ? exc.describe() : exc.message}${hintFor(exc)}`, false);
      button.disabled = false;
    }
  }

  function renderActions(st) {
    const who = st.whoami || {};
    const management = who.management !== false;
    const notes = {
      admin: "Activating a version moves the registry's live pointer: this replica switches at once, other replicas within their poll interval. A rejected candidate cannot go live.",
      reader: "Read-only: the key in use is the API key. The server refuses activation without the admin key.",
      anonymous: "No key entered: the server refuses activation without the admin key (enter it at the top of the page).",
    };
    fill("actions-note", management ? notes[who.role] || "" : MANAGEMENT_OFF);
    fill("actions-hint", management ? (who.role === "admin" ? "admin key in use" : "admin key required") : "management disabled");
    const versions = [...((st.models && st.models.versions) || [])].reverse();
    if (!versions.length) return fill("actions-table", h("p", { class: "muted", text: "No versions." }));
    const columns = ["version", "task", "state", "all tasks", "forgetting", "published", management ? "action" : null];
    const head = h("tr", {}, columns.filter(Boolean).map((t) => h("th", { text: t, class: ["all tasks", "forgetting"].includes(t) ? "num" : "" })));
    const rows = versions.map((v) => {
      const c = v.card || {};
      return h(
        "tr",
        {},
        h("td", { text: `v${v.version}` }),
        h("td", { text: c.task || v.tasks.at(-1) || "–" }),
        h("td", {}, badge(v.version === st.models.live ? "live" : v.state)),
        h("td", { class: "num", text: pct(c.final_accuracy) }),
        h("td", { class: "num", text: pct(c.forgetting) }),
        h("td", { class: "mono", text: when(v.created_at) }),
        management ? h("td", {}, actionButton(st, v)) : null,
      );
    });
    fill("actions-table", h("table", { class: "list", id: "actions-list" }, h("thead", {}, head), h("tbody", {}, rows)));
  }

  function renderManagement(st) {
    const management = !st.whoami || st.whoami.management !== false;
    $("upload-panel").hidden = !management;
    $("management-off-tasks").hidden = management;
    fill("management-off-tasks-text", MANAGEMENT_OFF);
  }

  function init(st) {
    $("upload-form").addEventListener("submit", (event) => upload(st, event));
    $("upload-file").addEventListener("change", () => {
      const file = $("upload-file").files[0];
      if (file && !$("upload-name").value.trim()) $("upload-name").value = file.name.replace(/\.(zip|tar|tgz|tar\.gz|tar\.bz2|tar\.xz)$/i, "");
    });
  }

  const isActive = (t) => ACTIVE.includes(t.status);
  window.FM.views.tasks = { render: renderTasks, init, isActive, active: (st) => (st.tasks || []).some(isActive) };
  window.FM.views.actions = { render: renderActions, renderManagement };
})();
