"""GET /models, activation, health, readiness, info, metrics, request ids, the error envelope."""

from __future__ import annotations

import base64
import time

import pytest

import fmlora
from fmlora.registry import WORKER_LEASE
from server.api.app import create_app
from server.api.settings import Settings

from .conftest import ADMIN, FakeEngine, assert_envelope, auth, png_bytes, publish_fake_version, wait_ready

ADMIN_H = auth(ADMIN)


@pytest.fixture
def versioned(registry):
    publish_fake_version(registry, ["pets"], card={"accuracy": {"pets": 0.91}, "final_accuracy": 0.91})
    publish_fake_version(
        registry,
        ["pets", "birds"],
        card={"accuracy": {"pets": 0.88, "birds": 0.8}, "final_accuracy": 0.84, "forgetting": 0.03},
    )
    publish_fake_version(registry, ["pets", "birds", "fish"], accepted=False)
    return registry


def test_models_lists_versions_with_cards_live_and_serving(make_client, versioned):
    client = make_client()
    body = client.get("/models").json()
    assert body["live"] == 2 and body["serving"] == 2
    assert [(v["version"], v["state"]) for v in body["versions"]] == [(1, "retired"), (2, "live"), (3, "rejected")]
    assert body["versions"][1]["card"]["accuracy"] == {"pets": 0.88, "birds": 0.8}
    recorded = versioned.get_version(2)
    assert body["versions"][1]["adapter_bytes"] == recorded.adapter_bytes > 0
    assert body["versions"][1]["sha256"] == recorded.sha256
    assert client.get("/models/1").json()["tasks"] == ["pets"]
    assert_envelope(client.get("/models/9"), 404, "version_not_found")
    assert_envelope(client.get("/models/abc"), 422, "validation_error")


def test_activation_rolls_back_and_the_reply_says_what_this_replica_serves(make_client, versioned):
    client = make_client()
    r = client.post("/models/1/activate", headers=ADMIN_H)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["live"] == 1 and body["serving"] == 1 and body["warning"] is None
    assert body["version"]["state"] == "live"
    assert versioned.live_version() == 1
    assert client.get("/models").json()["serving"] == 1


def test_activation_errors(make_client, versioned):
    client = make_client()
    assert_envelope(client.post("/models/42/activate", headers=ADMIN_H), 404, "version_not_found")
    assert_envelope(client.post("/models/3/activate", headers=ADMIN_H), 409, "version_state")
    assert_envelope(client.post("/models/0/activate", headers=ADMIN_H), 422, "validation_error")
    assert_envelope(client.get("/models/1/activate"), 405, "method_not_allowed")
    assert versioned.live_version() == 2


def test_activation_errors_do_not_reveal_server_paths(make_client, versioned):
    (versioned.snapshot_dir(1) / "adapter_config.json").unlink()
    client = make_client()
    error = assert_envelope(client.post("/models/1/activate", headers=ADMIN_H), 409, "version_state")
    assert "missing" in error["message"] and "$FMLORA_HOME" in error["message"]
    assert str(versioned.home) not in error["message"] and str(versioned.home.resolve()) not in error["message"]
    assert versioned.live_version() == 2


def test_activation_warns_when_this_replica_cannot_follow(make_client, versioned):
    class StuckEngine(FakeEngine):
        def reload(self):
            return self.serving_version  # the snapshot failed to load: keeps serving the old one

    client = make_client(engine=StuckEngine(registry=versioned))
    body = client.post("/models/1/activate", headers=ADMIN_H).json()
    assert body["live"] == 1 and body["serving"] == 2 and "could not be loaded" in body["warning"]


def test_readiness_waits_for_the_engine_and_liveness_does_not(make_client, registry):
    client = make_client(engine=FakeEngine(registry=registry, start_delay_s=0.5), wait=False)
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert_envelope(r, 503, "not_ready")
    assert r.headers["retry-after"] == "1"
    info = client.get("/info").json()
    assert info["ready"] is False and info["serving_version"] is None and info["tasks"] == [] and info["labels"] == 0
    wait_ready(client)
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["serving_version"] is None
    assert ready["degraded"] == [] and ready["dependencies"]["registry"] == "ok"


def test_engine_that_fails_to_start_makes_both_probes_fail_without_details(make_client, registry, caplog):
    client = make_client(engine=FakeEngine(registry=registry, fail_start=True), wait=False)
    deadline = time.monotonic() + 5
    while client.app.state.fmlora.startup_error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_envelope(client.get("/healthz"), 503, "engine_failed")
    r = client.get("/readyz")
    assert_envelope(r, 503, "not_ready")
    assert "passwd" not in r.text and "passwd" not in client.get("/healthz").text


def test_info_reports_each_fact_from_its_source(make_client, versioned):
    """Engine facts from the engine (not the settings), what this replica serves from the engine (not
    the registry's live pointer, which has moved on without it), limits and auth from the settings."""
    engine = FakeEngine(registry=versioned, info={"backend": "onnx", "device": "cuda:3", "dtype": "bfloat16"})
    client = make_client(engine=engine, max_images_per_request=7)
    versioned.activate(1)  # the registry moves; this replica has not reloaded yet
    info = client.get("/info").json()
    assert info["name"] == "fmlora" and info["version"] == fmlora.__version__
    assert info["backbone"] == versioned.model_config.backbone.name
    assert (info["backend"], info["device"], info["dtype"]) == ("onnx", "cuda:3", "bfloat16")
    assert info["live_version"] == 1
    assert info["serving_version"] == 2 and info["serving_sha256"] == f"{2:064x}"
    assert info["tasks"] == ["pets", "birds"] and info["labels"] == 3  # version 2's, not the live one's
    assert info["limits"]["max_images_per_request"] == 7 and info["limits"]["max_queue"] == 256
    assert info["auth"] == {"disabled": False, "admin_enabled": True, "api_key_required": False}
    assert info["training_worker"] is None  # no worker has taken the training lease
    assert versioned.acquire_lease(WORKER_LEASE, "trainer-7", ttl_s=60)
    assert client.get("/info").json()["training_worker"] == "trainer-7"
    versioned.release_lease(WORKER_LEASE, "trainer-7")
    assert client.get("/info").json()["training_worker"] is None


def test_metrics_report_requests_engine_and_live_card(make_client, versioned):
    client = make_client()
    image = base64.b64encode(png_bytes()).decode()
    for _ in range(2):
        assert client.post("/predict", json={"images": [image, image]}).status_code == 200
    client.get("/tasks/nope")
    client.post("/models/1/activate", headers=ADMIN_H)
    client.post("/models/2/activate", headers=ADMIN_H)
    text = client.get("/metrics").text
    assert 'fmlora_http_requests_total{method="POST",route="/predict",status="200"} 2.0' in text
    assert 'fmlora_http_requests_total{method="GET",route="/tasks/{task_id}",status="404"} 1.0' in text
    assert 'fmlora_http_request_duration_seconds_count{method="POST",route="/predict",status="200"} 2.0' in text
    assert "fmlora_predicted_images_total 4.0" in text
    assert "fmlora_batch_size_count 2.0" in text and "fmlora_batch_size_sum 4.0" in text
    assert "fmlora_queue_depth 0.0" in text
    assert "fmlora_swaps_total 3.0" in text and "fmlora_swaps_failed_total 1.0" in text
    assert 'fmlora_swap_duration_seconds_count{outcome="ok"} 2.0' in text
    assert "fmlora_live_version 2.0" in text and "fmlora_serving_version 2.0" in text
    assert f"fmlora_adapter_bytes {float(versioned.get_version(2).adapter_bytes)}" in text
    assert 'fmlora_task_accuracy{task="birds"} 0.8' in text and 'fmlora_task_accuracy{task="pets"} 0.88' in text
    assert "fmlora_live_final_accuracy 0.84" in text and "fmlora_live_forgetting 0.03" in text
    assert "fmlora_ready 1.0" in text and 'fmlora_build_info{backbone="vit_tiny_patch16_224"' in text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_two_apps_in_one_process_have_separate_metrics(make_client, registry):
    first, second = make_client(), make_client()
    for _ in range(3):
        first.get("/healthz")
    assert 'route="/healthz",status="200"} 3.0' in first.get("/metrics").text
    assert 'route="/healthz"' not in second.get("/metrics").text


def test_client_chosen_methods_do_not_add_metric_series(make_client):
    client = make_client()
    for i in range(5):
        assert_envelope(client.request(f"FOO{i}", "/no/such/route"), 404)
    text = client.get("/metrics").text
    assert "FOO" not in text
    assert 'fmlora_http_requests_total{method="OTHER",route="<unmatched>",status="404"} 5.0' in text


def test_request_ids_are_accepted_when_sane_and_generated_otherwise(make_client):
    client = make_client()
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123_x.y:z"}).headers["x-request-id"] == "abc-123_x.y:z"
    for bad in ("", "x" * 200, "has space", "<script>", "-leading"):
        rid = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert rid != bad and len(rid) == 32
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_unknown_routes_and_methods_use_the_envelope(make_client):
    client = make_client()
    error = assert_envelope(client.get("/no/such/route"), 404, "not_found")
    assert "/no/such/route" in error["message"]
    r = client.put("/tasks")
    assert_envelope(r, 405, "method_not_allowed")
    assert r.headers["allow"]


def test_invalid_content_length_is_400(make_client):
    client = make_client()
    r = client.post("/predict", content=b"{}", headers={"Content-Type": "application/json", "Content-Length": "x"})
    error = assert_envelope(r, 400, "bad_request")
    assert "Content-Length" in error["message"]


def test_shutdown_stops_the_engine_with_the_configured_timeout(registry, home):
    from fastapi.testclient import TestClient

    engine = FakeEngine(registry=registry)
    app = create_app(Settings(home=home, admin_key=ADMIN, shutdown_timeout_s=7), engine=engine, registry=registry)
    with TestClient(app) as client:
        wait_ready(client)
        assert not engine.stopped
    assert engine.stopped and engine.stop_timeout == 7


def test_cors_is_off_by_default_and_configurable(make_client):
    plain = make_client()
    r = plain.options("/predict", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    cors = make_client(cors_origins=["https://x.example"])
    r = cors.options("/predict", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "POST"})
    assert r.headers["access-control-allow-origin"] == "https://x.example"


def test_settings_come_from_fmlora_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("FMLORA_HOME", str(tmp_path))
    monkeypatch.setenv("FMLORA_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("FMLORA_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("FMLORA_CORS_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("FMLORA_AUTH_DISABLED", "false")
    s = Settings()
    assert s.home == tmp_path and s.max_batch_size == 8 and s.admin_key.get_secret_value() == ADMIN
    assert s.cors_origins == ["https://a.example"]
    monkeypatch.setenv("FMLORA_ADMIN_KEY", "")
    assert Settings().admin_key is None
    with pytest.raises(ValueError):
        Settings(max_queue=4, max_images_per_request=8)
    with pytest.raises(ValueError):
        Settings(device="tpu")
