// Versions view: summary, the version ring, one version's evaluation card and accuracy matrix,
// every version's size and DRS rank, and the diff of two versions (computed here from GET /models
// and GET /tasks).
"use strict";

(() => {
  const { h, $, fill, pct, signedPct, int, bytes, seconds, num, short, when, heatColor, badge, bars, isNum } = window.FM;

  const byVersion = (models, v) => (models.versions || []).find((x) => x.version === v) || null;

  function tile(label, value, sub, id) {
    return h("div", { class: "tile", id }, h("div", { class: "label", text: label }), h("div", { class: "value", text: value }), h("div", { class: "sub", text: sub || "\u00a0" }));
  }

  function renderSummary(st) {
    const { models, info } = st;
    const live = byVersion(models, models.live);
    const card = (live && live.card) || {};
    const sizes = [...new Set((models.versions || []).map((v) => v.adapter_bytes))];
    const sizeNote = sizes.length <= 1 ? (models.versions.length > 1 ? "the same in every version" : "") : `${sizes.length} sizes across versions`;
    fill(
      "summary",
      tile("Live version", live ? `v${live.version}` : "none", live ? `learned ${card.task || live.tasks.at(-1) || "–"}` : "nothing published yet", "tile-live"),
      tile("This replica serves", isNum(models.serving) ? `v${models.serving}` : "–", info ? `${info.device} · ${info.dtype}` : ""),
      tile("Tasks learned", live ? String(live.tasks.length) : "0", live ? live.tasks.join(", ") : ""),
      tile("Accuracy (all tasks)", pct(card.final_accuracy), isNum(card.average_incremental_accuracy) ? `average incremental ${pct(card.average_incremental_accuracy)}` : ""),
      tile("Forgetting", pct(card.forgetting), "mean drop from the best"),
      tile("Adapter", live ? bytes(live.adapter_bytes) : "–", sizeNote),
    );
  }

  function chip(st, v) {
    const tags = [];
    if (v.version === st.models.live) tags.push(badge("live"));
    if (v.version === st.models.serving) tags.push(badge("serving"));
    if (v.state === "rejected") tags.push(badge("rejected"));
    if (v.state === "retired") tags.push(badge("retired", "retired"));
    const acc = v.card && v.card.final_accuracy;
    return h(
      "button",
      {
        type: "button",
        class: `chip ${v.state}${v.version === st.selected ? " selected" : ""}`,
        data: { version: String(v.version) },
        title: `v${v.version}: ${v.tasks.join(", ")}`,
        onclick: () => select(st, v.version),
      },
      h("div", { class: "v", text: `v${v.version}` }),
      h("div", { class: "t", text: `${(v.card && v.card.task) || v.tasks.at(-1) || "–"}${isNum(acc) ? ` · ${pct(acc)}` : ""}` }),
      h("div", { class: "tags" }, tags),
    );
  }

  function renderRing(st) {
    const versions = st.models.versions || [];
    if (!versions.length) return fill("ring", h("p", { class: "muted", text: "No version yet: submit a task and the worker publishes one." }));
    fill("ring", versions.map((v) => chip(st, v)));
  }

  function kv(k, val, title) {
    return h("div", { title }, h("div", { class: "k", text: k }), h("div", { class: "val", text: val }));
  }

  function renderCard(st) {
    const v = byVersion(st.models, st.selected);
    if (!v) {
      fill("card-title", "Evaluation card");
      fill("card-verdict");
      fill("card-body", "No version published yet.").className = "empty";
      return;
    }
    const card = v.card || {};
    const gate = card.gate || null;
    const train = card.train || {};
    fill("card-title", `v${v.version} · ${card.task || v.tasks.at(-1) || ""}`);
    let verdict;
    if (v.state === "rejected" || (gate && gate.passed === false)) verdict = badge("rejected by the gate", "rejected");
    else if (gate) verdict = badge("gate passed", "passed");
    else verdict = badge("no gate verdict", "retired");
    fill("card-verdict", verdict);
    const reasons = gate && gate.reasons && gate.reasons.length ? h("ul", { class: "reasons" }, gate.reasons.map((r) => h("li", { text: r }))) : null;
    const limits = gate
      ? h("p", { class: "muted", text: `Gate: new-task accuracy ≥ ${pct(gate.min_new_task_accuracy)}, forgetting ≤ ${pct(gate.max_forgetting)}.` })
      : null;
    const tasks = card.tasks || v.tasks || [];
    const acc = card.accuracy || {};
    const forgetting = card.forgetting_vs_parent || {};
    const body = fill(
      "card-body",
      reasons,
      h(
        "div",
        { class: "kv" },
        kv("New-task accuracy", pct(card.new_task_accuracy)),
        kv("Accuracy, all tasks", pct(card.final_accuracy), "pooled over every task's held-out images"),
        kv("Average incremental", pct(card.average_incremental_accuracy)),
        kv("Forgetting", pct(card.forgetting), "mean over old tasks of best-ever minus now"),
        kv("Adapter", bytes(v.adapter_bytes)),
        kv("DRS rank", isNum(train.rank) ? String(train.rank) : "–", "rank the dynamic rank selector chose for this task"),
        kv("Trainable params", int(train.trainable_parameters)),
        kv("Training", isNum(train.seconds) ? `${train.epochs} ep · ${seconds(train.seconds)}` : "–"),
        kv("Final loss", num(train.final_loss)),
      ),
      h("h3", { text: "Accuracy per task after this version" }),
      bars(tasks.filter((t) => isNum(acc[t])).map((t) => [t, acc[t], pct(acc[t])]), { empty: "no per-task accuracy in this card" }),
      h("h3", { text: "Forgetting versus the parent version" }),
      bars(
        Object.entries(forgetting).map(([t, d]) => [t, Math.max(0, d), signedPct(-d)]),
        { bad: true, empty: v.parent ? "no earlier task" : "first version: nothing to forget" },
      ),
      h("p", { class: "muted" }, `parent ${v.parent ? `v${v.parent}` : "none"} · sha256 `, h("code", { text: short(v.sha256), title: v.sha256 }), ` · ${when(v.created_at)}`),
      limits,
    );
    body.className = "";
  }

  function renderHeatmap(st) {
    const v = byVersion(st.models, st.selected);
    const card = (v && v.card) || {};
    const tasks = card.tasks || (v && v.tasks) || [];
    let rows = card.accuracy_matrix;
    let note = null;
    if (!Array.isArray(rows) || !rows.length) {
      if (!v || !card.accuracy) return fill("heatmap", "No evaluation yet.").classList.add("empty");
      rows = [tasks.map((t) => card.accuracy[t])];
      note = "This card has only the last row (no accuracy matrix).";
    }
    const offset = tasks.length - rows.length; // a card without the full matrix shows its last rows
    const head = h("tr", {}, h("th", { text: "after ↓ / on →" }), tasks.map((t) => h("th", { text: t, title: t })));
    const body = rows.map((row, i) =>
      h(
        "tr",
        {},
        h("th", { class: "row", text: tasks[i + offset] || `task ${i + offset + 1}` }),
        tasks.map((_, j) => {
          const value = row[j];
          if (!isNum(value)) return h("td", { class: "blank" });
          return h("td", { text: pct(value, 0), title: `${pct(value)} on ${tasks[j]} after ${tasks[i + offset]}`, style: { background: heatColor(value), color: value > 0.6 ? "#fff" : "#1d2430" } });
        }),
      ),
    );
    const legend = h(
      "div",
      { class: "legend" },
      "0%",
      h("div", { class: "scale" }, [0, 0.2, 0.4, 0.6, 0.8, 1].map((x) => h("span", { style: { background: heatColor(x) } }))),
      "100%",
    );
    const el = fill("heatmap", h("table", { class: "heat", id: "heatmap-table" }, h("thead", {}, head), h("tbody", {}, body)), legend, note && h("p", { class: "muted", text: note }));
    el.className = "";
  }

  function renderTable(st) {
    const versions = [...(st.models.versions || [])].reverse();
    if (!versions.length) return fill("versions-table", h("p", { class: "muted", text: "No versions." }));
    const head = h("tr", {}, ["version", "task", "state", "new task", "all tasks", "forgetting", "DRS rank", "adapter bytes"].map((t, i) => h("th", { text: t, class: i >= 3 ? "num" : "" })));
    const rows = versions.map((v) => {
      const c = v.card || {};
      const state = v.version === st.models.live ? "live" : v.state;
      return h(
        "tr",
        {},
        h("td", {}, h("a", { href: "#versions", text: `v${v.version}`, onclick: () => select(st, v.version) })),
        h("td", { text: c.task || v.tasks.at(-1) || "–" }),
        h("td", {}, badge(state)),
        h("td", { class: "num", text: pct(c.new_task_accuracy) }),
        h("td", { class: "num", text: pct(c.final_accuracy) }),
        h("td", { class: "num", text: pct(c.forgetting) }),
        h("td", { class: "num", text: c.train && isNum(c.train.rank) ? String(c.train.rank) : "–" }),
        h("td", { class: "num", text: int(v.adapter_bytes) }),
      );
    });
    fill("versions-table", h("table", { class: "list" }, h("thead", {}, head), h("tbody", {}, rows)));
  }

  /** Refill a select; a value the operator picked stays, otherwise the preferred one is shown. */
  function syncSelect(select, options, preferred, keep) {
    const previous = select.value;
    select.replaceChildren(...options.map(([value, label]) => h("option", { value, text: label })));
    const values = options.map(([value]) => value);
    select.value = keep && values.includes(previous) ? previous : values.includes(preferred) ? preferred : values[0] || "";
  }

  function classesOf(st, taskName) {
    const task = (st.tasks || []).find((t) => t.name === taskName && !["rejected", "failed"].includes(t.status)) || (st.tasks || []).find((t) => t.name === taskName);
    return task ? task.classes : null;
  }

  function renderDiff(st) {
    const versions = st.models.versions || [];
    const options = versions.map((v) => [String(v.version), `v${v.version} · ${(v.card && v.card.task) || v.tasks.at(-1) || ""}${v.state === "rejected" ? " (rejected)" : ""}`]);
    const b = st.models.live || (versions.at(-1) && versions.at(-1).version);
    const bInfo = byVersion(st.models, b);
    const a = bInfo && bInfo.parent ? bInfo.parent : versions.length > 1 ? versions.at(-2).version : b;
    // Until the operator picks a pair, the diff shows what the live version changed from its parent.
    syncSelect($("diff-a"), options, String(a), st.diffByHand);
    syncSelect($("diff-b"), options, String(b), st.diffByHand);
    const va = byVersion(st.models, Number($("diff-a").value));
    const vb = byVersion(st.models, Number($("diff-b").value));
    if (!va || !vb || versions.length < 2) return fill("diff-body", "Two versions are needed.").classList.add("empty");
    const accA = (va.card && va.card.accuracy) || {};
    const accB = (vb.card && vb.card.accuracy) || {};
    const names = [...new Set([...(vb.card && vb.card.tasks) || vb.tasks, ...(va.card && va.card.tasks) || va.tasks])];
    const rows = names.map((t) => {
      const x = accA[t];
      const y = accB[t];
      const d = isNum(x) && isNum(y) ? y - x : null;
      const cls = d === null ? "" : d > 0.0005 ? "delta-up" : d < -0.0005 ? "delta-down" : "";
      return h(
        "tr",
        {},
        h("td", { text: t }),
        h("td", { class: "num", text: isNum(x) ? pct(x) : "not learned" }),
        h("td", { class: "num", text: isNum(y) ? pct(y) : "not learned" }),
        h("td", { class: `num ${cls}`, text: d === null ? "–" : signedPct(d) }),
      );
    });
    const added = vb.tasks.filter((t) => !va.tasks.includes(t));
    const removed = va.tasks.filter((t) => !vb.tasks.includes(t));
    const classList = (tasks) =>
      tasks.length
        ? h("div", { class: "classes" }, tasks.flatMap((t) => (classesOf(st, t) || [`${t} (classes unknown)`]).map((c) => h("span", { class: "badge", text: c, title: `task ${t}` }))))
        : h("span", { class: "muted", text: "none" });
    const sizeDelta = vb.adapter_bytes - va.adapter_bytes;
    const el = fill(
      "diff-body",
      h(
        "table",
        { class: "list", id: "diff-table" },
        h("thead", {}, h("tr", {}, h("th", { text: "task" }), h("th", { class: "num", text: `v${va.version}` }), h("th", { class: "num", text: `v${vb.version}` }), h("th", { class: "num", text: "change" }))),
        h("tbody", {}, rows),
      ),
      h("h3", { text: `Classes added in v${vb.version}` }),
      classList(added),
      removed.length ? [h("h3", { text: `Classes not in v${vb.version}` }), classList(removed)] : null,
      h("p", { class: "muted", text: `All tasks: ${pct(va.card && va.card.final_accuracy)} → ${pct(vb.card && vb.card.final_accuracy)} · adapter ${int(va.adapter_bytes)} → ${int(vb.adapter_bytes)} bytes (${sizeDelta === 0 ? "unchanged" : `${sizeDelta > 0 ? "+" : ""}${int(sizeDelta)}`})` }),
    );
    el.className = "";
  }

  /** An operator's choice sticks; until one is made, the card follows the live version. */
  function select(st, version) {
    st.selected = version;
    st.selectedByHand = true;
    render(st);
  }

  function render(st) {
    if (!st.models) return;
    const versions = st.models.versions || [];
    if (!st.selectedByHand || !byVersion(st.models, st.selected)) {
      st.selected = st.models.live || (versions.at(-1) && versions.at(-1).version) || null;
    }
    renderSummary(st);
    renderRing(st);
    renderCard(st);
    renderHeatmap(st);
    renderTable(st);
    renderDiff(st);
  }

  function init(st) {
    for (const id of ["diff-a", "diff-b"]) {
      $(id).addEventListener("change", () => {
        st.diffByHand = true;
        if (st.models) renderDiff(st);
      });
    }
  }

  window.FM.views.versions = { render, init };
})();
