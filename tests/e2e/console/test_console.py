"""The operator console in a real browser (headless chromium) against a real `fmlora serve`.

The tests run in file order on one server and one browser: the home starts with v1–v3 live in turn,
v4 rejected by the gate and one failed task; an upload through the page adds v5; a rollback through
the page makes v2 live.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.api.settings import Settings
from tests.e2e.console.conftest import API_KEY, api, models
from tests.e2e.test_serve import ADMIN, free_port, png, zip_task

pytestmark = pytest.mark.timeout(180)


def test_console_loads_without_console_errors_and_carries_no_secret(console, served):
    console.driver.get(f"{served.url}/console")
    console.wait(lambda: "needs a key" in console.text("notice"), "the page to ask for a key")
    assert console.errors() == []

    console.use_key(API_KEY)
    console.wait(lambda: len(console.all("#ring .chip")) == 4, "the version ring")
    console.wait(lambda: console.all("#heatmap-table"), "the accuracy matrix")
    assert console.text("tile-live").startswith("Live versionv3")
    assert console.errors() == []

    # The key lives in sessionStorage and the Authorization header only: not in the DOM, not in the URL.
    assert API_KEY not in console.driver.page_source and ADMIN not in console.driver.page_source
    assert API_KEY not in console.driver.current_url
    assert console.driver.execute_script("return sessionStorage.getItem('fmlora.console.key')") == API_KEY

    page = httpx.get(f"{served.url}/console", timeout=10)
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) == []  # no inline script at all
    assert ADMIN not in page.text and API_KEY not in page.text


def test_without_the_admin_key_actions_are_refused_and_say_why(console, served):
    console.open("actions")
    console.use_key(API_KEY)
    console.wait(lambda: "Read-only" in console.text("actions-note"), "the read-only note")
    console.activate(2)
    console.wait(lambda: "403" in console.text("actions-result"), "the refusal")
    message = console.text("actions-result")
    assert "not allowed to manage the server (admin key required)" in message and "enter the admin key" in message
    assert models(served)["live"] == 3

    console.use_key(None)
    console.activate(2)
    console.wait(lambda: "401" in console.text("actions-result"), "the refusal without a key")
    assert "missing Authorization header" in console.text("actions-result")
    assert models(served)["live"] == 3
    # The only errors in the log are the two refused calls themselves.
    refused = console.errors()
    assert len(refused) == 2 and all("status of 40" in e for e in refused), refused


def test_docs_and_redoc_render_offline(console, served):
    console.driver.get(f"{served.url}/docs")
    console.wait(lambda: len(console.all(".swagger-ui .opblock")) >= 10, "Swagger UI's operations")
    assert "/predict" in console.find(".swagger-ui").text
    assert console.loaded_from_elsewhere() == []
    console.screenshot("docs", full=False)
    console.driver.get(f"{served.url}/redoc")
    console.wait(lambda: "/models/{version}/activate" in console.find("#redoc").text, "ReDoc's operations")
    assert console.loaded_from_elsewhere() == []
    assert console.errors() == []


def test_management_actions_are_absent_when_management_is_disabled(console, served):
    # A second, in-process replica of the same home without an admin key: management is off there.
    settings = Settings(home=served.home, admin_key=None, device="cpu", embedded_worker=False)
    port = free_port()
    replica = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=replica.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the in-process replica did not get ready"
            time.sleep(0.1)
        console.driver.get(f"{url}/console#tasks")
        console.wait(lambda: console.visible("management-off-tasks"), "the management notice")
        assert not console.visible("upload-panel")
        assert "Management is disabled" in console.text("management-off-tasks")
        console.driver.execute_script("window.location.hash = 'actions'")
        console.wait(lambda: console.all("#actions-list"), "the versions list")
        assert "Management is disabled" in console.text("actions-note")
        assert console.all("[data-activate]") == []
        assert console.errors() == []
    finally:
        replica.should_exit = True
        thread.join(30)


def test_task_uploaded_through_the_page_goes_live_and_shows_its_accuracy_matrix(console, served, tmp_path):
    archive = tmp_path / "shapes.zip"
    archive.write_bytes(zip_task({"circle": (240, 200, 20), "square": (150, 30, 200)}, per_class=8))
    console.open("tasks")
    console.use_key(ADMIN)
    console.find("#upload-file").send_keys(str(archive))
    assert console.find("#upload-name").get_attribute("value") == "shapes"
    console.find("#upload-submit").click()
    console.wait(lambda: "queued" in console.text("upload-result"), "the upload to be accepted")
    console.wait(lambda: console.all('#tasks-list tr[data-task="shapes"][data-status="live"]'), "v5 to go live", 120)
    rows = console.rows("#tasks-list tbody tr")  # cells: task (name, id), kind, status, progress, version, outcome
    outcome = {name: next(r[5] for r in rows if r[0].startswith(name)) for name in ("twins", "broken")}
    assert outcome["twins"] == "gate: new-task accuracy 0.0000 is below the minimum 0.6000"
    assert outcome["broken"] == "a stored task has no images in one of its splits"
    console.screenshot("tasks")

    state = models(served)
    assert state["live"] == 5
    card = state["versions"][-1]["card"]
    console.open("versions")
    console.wait(lambda: console.text("tile-live").startswith("Live versionv5"), "the live tile to say v5")
    tasks = ["fruit", "sky", "sea", "shapes"]
    heat = console.wait(
        lambda: (rows := console.rows("#heatmap-table tbody tr")) and [r[0] for r in rows] == tasks and rows,
        "the accuracy matrix of v5",
    )
    assert heat[-1][1:] == [f"{100 * a:.0f}%" for a in card["accuracy_matrix"][-1]]
    console.screenshot("versions")


def test_rollback_through_the_page_changes_what_models_reports(console, served):
    console.open("actions")
    console.use_key(ADMIN)
    console.wait(lambda: "Activating a version" in console.text("actions-note"), "the admin note")
    assert console.wait(lambda: console.all('[data-activate="2"]'), "the rollback button")[0].text == "Roll back to v2"
    console.activate(2)
    console.wait(lambda: "v2 is live" in console.text("actions-result"), "the rollback")
    state = models(served)
    assert (state["live"], state["serving"]) == (2, 2)
    console.wait(lambda: console.all('#actions-list [data-activate="5"]'), "v5 offered as a roll-forward")
    console.screenshot("actions")
    assert console.errors() == []


def _same_prediction(page: dict, answer: dict) -> None:
    assert page["model_version"] == answer["model_version"] and page["snapshot_sha256"] == answer["snapshot_sha256"]
    for mine, theirs in zip(page["results"], answer["results"], strict=True):
        assert [(p["label"], p["task"]) for p in mine["predictions"]] == [
            (p["label"], p["task"]) for p in theirs["predictions"]
        ]
        assert [p["score"] for p in mine["predictions"]] == pytest.approx([p["score"] for p in theirs["predictions"]])
        assert (mine["prompt"]["mode"], mine["prompt"]["task"]) == (theirs["prompt"]["mode"], theirs["prompt"]["task"])


def test_playground_prediction_equals_the_api_answer(console, served, tmp_path):
    image = tmp_path / "dawn.png"
    image.write_bytes(png((250, 170, 60)))
    console.open("playground")
    console.use_key(API_KEY)
    console.find("#pg-file").send_keys(str(image))
    console.wait(
        lambda: console.driver.execute_script("return !document.getElementById('pg-preview').hidden"), "preview"
    )

    def classify() -> dict:
        console.driver.execute_script("document.getElementById('pg-raw').textContent = ''")
        console.find("#pg-submit").click()
        raw = console.wait(lambda: console.text("pg-raw"), "the prediction")
        return json.loads(raw)

    page = classify()
    files = {"images": ("dawn.png", image.read_bytes(), "image/png")}
    answer = api(served, "POST", "/predict", files=files, data={"top_k": "5", "prompt": "auto"})
    assert answer.status_code == 200, answer.text
    _same_prediction(page, answer.json())
    assert page["model_version"] == 2  # what the rollback left live
    assert console.text("pg-answered") == "answered by v2"

    # A task's meta-prompt on a pinned version.
    console.driver.execute_script(
        "const s = document.getElementById('pg-version'); s.value = '5'; s.dispatchEvent(new Event('change'));"
        "const m = document.getElementById('pg-mode'); m.value = 'task'; m.dispatchEvent(new Event('change'));"
    )
    console.wait(lambda: "shapes" in console.text("pg-task"), "the pinned version's tasks")
    console.driver.execute_script("document.getElementById('pg-task').value = 'sky'")
    page = classify()
    data = {"top_k": "5", "prompt": json.dumps({"task": "sky"}), "version": "5"}
    answer = api(served, "POST", "/predict", files=files, data=data)
    assert answer.status_code == 200, answer.text
    _same_prediction(page, answer.json())
    assert page["model_version"] == 5 and page["results"][0]["prompt"]["task"] == "sky"
    console.screenshot("playground")
    assert console.errors() == []
