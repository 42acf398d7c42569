// Playground: one image through POST /predict (multipart, as any client sends it), with the prompt
// mode, an optional pinned version and top-k; shows the labels with scores, the meta-prompt the
// server used and the version that answered.
"use strict";

(() => {
  const { h, $, fill, pct, short, bars, api, isNum } = window.FM;
  let file = null;
  let previewUrl = null;

  function choose(chosen) {
    if (!chosen) return;
    if (!chosen.type.startsWith("image/") && chosen.type !== "") {
      fill("pg-result", h("p", { class: "error-text", text: `${chosen.name} is not an image (${chosen.type}).` }));
      return;
    }
    file = chosen;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(chosen);
    const img = $("pg-preview");
    img.src = previewUrl;
    img.hidden = false;
    fill("drop-text", `${chosen.name} · drop another to replace it`);
  }

  function versionTasks(st) {
    const pinned = Number($("pg-version").value);
    const versions = (st.models && st.models.versions) || [];
    const v = versions.find((x) => x.version === (pinned || st.models.serving || st.models.live));
    return v ? v.tasks : (st.info && st.info.tasks) || [];
  }

  function syncTasks(st) {
    const select = $("pg-task");
    const previous = select.value;
    const tasks = versionTasks(st);
    select.replaceChildren(...tasks.map((t) => h("option", { value: t, text: t })));
    if (tasks.includes(previous)) select.value = previous;
    $("pg-task-label").hidden = $("pg-mode").value !== "task";
  }

  function render(st) {
    const select = $("pg-version");
    const previous = select.value;
    const versions = [...((st.models && st.models.versions) || [])].reverse();
    const serving = st.models && isNum(st.models.serving) ? ` (v${st.models.serving})` : "";
    select.replaceChildren(
      h("option", { value: "", text: `the one served now${serving}` }),
      ...versions.filter((v) => v.state !== "rejected").map((v) => h("option", { value: String(v.version), text: `v${v.version} · ${v.tasks.at(-1) || ""}` })),
    );
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
    syncTasks(st);
  }

  function prompt() {
    const mode = $("pg-mode").value;
    if (mode !== "task") return mode;
    return JSON.stringify({ task: $("pg-task").value });
  }

  function showResult(data) {
    const first = (data.results || [])[0] || { predictions: [], prompt: {} };
    const used = first.prompt || {};
    fill("pg-answered", h("span", { class: "badge serving", text: `answered by v${data.model_version}` }));
    const weights = Object.entries(used.weights || {}).sort((a, b) => b[1] - a[1]).slice(0, 8);
    const rows = first.predictions.map((p, i) =>
      h(
        "tr",
        {},
        h("td", { class: "num", text: String(i + 1) }),
        h("td", { class: "label", text: p.label }),
        h("td", { class: "muted", text: p.task || "–" }),
        h("td", { class: "num score", text: p.score.toFixed(4) }),
        h("td", { class: "bar-cell" }, bars([["", p.score, pct(p.score)]])),
      ),
    );
    const el = fill(
      "pg-result",
      h(
        "table",
        { class: "list", id: "pg-predictions" },
        h("thead", {}, h("tr", {}, h("th", { class: "num", text: "#" }), h("th", { text: "label" }), h("th", { text: "task" }), h("th", { class: "num", text: "score" }), h("th", { text: "" }))),
        h("tbody", {}, rows),
      ),
      h("h3", { text: "Meta-prompt used" }),
      h("p", { id: "pg-prompt" }, h("span", { class: "badge", text: `mode ${used.mode || "–"}` }), " ", used.task ? h("span", { class: "badge serving", text: `task ${used.task}` }) : null),
      weights.length ? bars(weights.map(([name, w]) => [name, w, w.toFixed(3)])) : h("p", { class: "muted", text: "no mixture weights (a fixed prompt or none)" }),
      h("p", { class: "muted" }, `version v${data.model_version} · snapshot sha256 `, h("code", { text: short(data.snapshot_sha256), title: data.snapshot_sha256 || "" })),
    );
    el.className = "";
    $("pg-raw").textContent = JSON.stringify(data, null, 2);
  }

  async function classify(event) {
    event.preventDefault();
    if (!file) return fill("pg-result", h("p", { class: "error-text", text: "Drop or choose an image first." }));
    const form = new FormData();
    form.append("images", file, file.name || "image");
    form.append("top_k", String(Math.max(1, Math.min(1000, Number($("pg-topk").value) || 5))));
    form.append("prompt", prompt());
    if ($("pg-version").value) form.append("version", $("pg-version").value);
    $("pg-submit").disabled = true;
    try {
      showResult(await api("predict", { method: "POST", body: form }));
    } catch (exc) {
      fill("pg-answered");
      fill("pg-result", h("p", { class: "error-text", text: `Refused: ${exc.describe ? exc.describe() : exc.message}` }));
      $("pg-raw").textContent = "";
    } finally {
      $("pg-submit").disabled = false;
    }
  }

  function init(st) {
    const drop = $("drop");
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      choose(event.dataTransfer.files[0]);
    });
    $("pg-file").addEventListener("change", () => choose($("pg-file").files[0]));
    $("pg-mode").addEventListener("change", () => syncTasks(st));
    $("pg-version").addEventListener("change", () => syncTasks(st));
    $("pg-form").addEventListener("submit", classify);
  }

  window.FM.views.playground = { render, init };
})();
