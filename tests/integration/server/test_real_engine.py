"""The app with the real engine (tiny ViT on CPU): lifespan builds it from settings, predictions come
from the live snapshot, activation swaps this replica at once, and the engine stops on shutdown."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.settings import Settings
from tests.e2e._homes import publish_tiny_version, tiny_home
from tests.helpers import learn_quickly

from .conftest import ADMIN, assert_envelope, auth, png_bytes, wait_ready

IMAGES = [base64.b64encode(png_bytes((40, 30), c)).decode() for c in ((200, 10, 10), (10, 200, 10))]


def metric(text: str, sample: str) -> float:
    """The value of the sample line that starts with ``sample`` (name and labels) in /metrics."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
    assert len(values) == 1, sample
    return values[0]


def settings(home, **overrides) -> Settings:
    values = {"home": home, "admin_key": ADMIN, "device": "cpu", "poll_interval_s": 0.05, "max_wait_ms": 1.0}
    values.update(overrides)
    return Settings(**values)


def test_real_engine_serves_the_live_version_and_swaps_on_activation(tmp_path):
    home = tmp_path / "home"
    registry, model = tiny_home(home, {"pets": ["cat", "dog"]})
    app = create_app(settings(home))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client, timeout=60)
        r = client.post("/predict", json={"images": IMAGES, "top_k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == 1
        assert body["snapshot_sha256"] == registry.get_version(1).sha256
        assert len(body["results"]) == 2
        for result in body["results"]:
            assert {p["label"] for p in result["predictions"]} == {"cat", "dog"}
            assert abs(sum(p["score"] for p in result["predictions"]) - 1.0) < 1e-4
            assert all(p["task"] == "pets" for p in result["predictions"])
            assert result["prompt"]["mode"] == "auto"

        r = client.post("/predict", json={"images": IMAGES[:1], "prompt": {"task": "birds"}})
        assert_envelope(r, 422, "unknown_task")

        learn_quickly(model, "birds", ["robin", "crow"], seed=5)
        publish_tiny_version(registry, model, "birds")
        registry.activate(1)  # roll back in the registry, then forward through the API
        r = client.post("/models/2/activate", headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        assert r.json()["live"] == 2 and r.json()["serving"] == 2 and r.json()["warning"] is None

        r = client.post("/predict", json={"images": IMAGES[:1], "top_k": 4, "prompt": {"task": "birds"}})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == 2
        assert {p["label"] for p in r.json()["results"][0]["predictions"]} == {"cat", "dog", "robin", "crow"}

        pinned = client.post("/predict", json={"images": IMAGES[:1], "version": 1}).json()
        assert pinned["model_version"] == 1

        info = client.get("/info").json()
        assert info["device"] == "cpu" and info["dtype"] == "float32" and info["serving_version"] == 2
        assert info["tasks"] == ["pets", "birds"] and info["labels"] == 4

        metrics = client.get("/metrics").text
        assert "fmlora_serving_version 2.0" in metrics and "fmlora_live_version 2.0" in metrics
        assert 'fmlora_task_accuracy{task="birds"}' in metrics
        # Three requests reached the model (two images, then one, then one pinned): the engine's batch
        # hooks fed the histograms; its swaps (version 1 at start, then 2, and 1 and 2 again if the
        # watcher saw the registry's rollback) fed the swap histogram and agree with its counters.
        assert metric(metrics, "fmlora_predicted_images_total") == 4
        assert metric(metrics, "fmlora_batch_size_sum") == 4 and 3 <= metric(metrics, "fmlora_batch_size_count") <= 4
        swaps = metric(metrics, "fmlora_swaps_total")
        assert 2 <= swaps <= 4 and metric(metrics, 'fmlora_swap_duration_seconds_count{outcome="ok"}') == swaps
        assert metric(metrics, "fmlora_swaps_failed_total") == 0
        # Every swap reports its stages; a swap that loaded a version fetched and probed it.
        assert metric(metrics, 'fmlora_swap_stage_duration_seconds_count{stage="swap"}') == swaps
        assert 2 <= metric(metrics, 'fmlora_swap_stage_duration_seconds_count{stage="probe"}') <= swaps
        assert metric(metrics, "fmlora_serving_since_timestamp_seconds") > 0
        engine = app.state.fmlora.engine
    assert not engine.ready  # stopped by the lifespan


def test_without_a_live_version_the_server_is_ready_but_predictions_are_503(tmp_path):
    home = tmp_path / "home"
    tiny_home(home)
    with TestClient(create_app(settings(home)), raise_server_exceptions=False) as client:
        wait_ready(client, timeout=60)
        r = client.post("/predict", json={"images": IMAGES[:1]})
        assert_envelope(r, 503, "no_model")
        assert int(r.headers["retry-after"]) >= 1
        assert client.get("/models").json() == {"live": None, "serving": None, "versions": []}
