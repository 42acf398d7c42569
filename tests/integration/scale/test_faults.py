"""A replica on PostgreSQL + S3 (moto) through a database outage: the real app and engine (tiny ViT on
CPU), the real throwaway PostgreSQL stopped with pg_ctl and started again.

While the database is down the replica keeps answering predictions from the version it holds (none
fail), /readyz stays 200 and names the degraded dependency, admin writes answer 503 with Retry-After;
once it is back, everything resumes without a restart.
"""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.testclient import TestClient

from fmlora.model import FMLoRAModel
from fmlora.registry.registry import Registry
from server.api.app import create_app, open_registry
from server.api.settings import Settings
from tests.e2e._homes import publish_tiny_version, tiny_file_config
from tests.helpers import learn_quickly
from tests.integration.registry.services import postgres_cluster, postgres_url, s3_bucket  # noqa: F401
from tests.integration.server.conftest import ADMIN, auth, png_bytes, wait_ready

IMAGES = [base64.b64encode(png_bytes((40, 30), (200, 10, 10))).decode()]
OUTAGE_S = 10.0  # the outage issue 15 names


def _until(check, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture
def replica_settings(tmp_path, postgres_url, s3_bucket, monkeypatch):  # noqa: F811
    server, bucket = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    config = tiny_file_config(tmp_path / "backbone")
    (tmp_path / "model.json").write_text(config.model_dump_json())
    return Settings(
        home=tmp_path / "replica",
        registry_url=postgres_url,
        store_url=f"s3://{bucket}/fmlora",
        s3_endpoint_url=server.endpoint,
        s3_region="us-east-1",
        s3_addressing_style="path",
        model_config_file=tmp_path / "model.json",
        admin_key=ADMIN,
        device="cpu",
        poll_interval_s=0.1,
        max_wait_ms=1.0,
    )


def test_a_replica_rides_out_a_database_outage(tmp_path, replica_settings):
    # The publisher: another host, with its own HOME, on the same database and bucket.
    publisher = open_registry(replica_settings.model_copy(update={"home": tmp_path / "publisher"}))
    assert isinstance(publisher, Registry) and publisher.db.dialect == "postgresql"
    torch_model = FMLoRAModel(publisher.model_config)
    learn_quickly(torch_model, "pets", ["cat", "dog"], seed=0)
    v1 = publish_tiny_version(publisher, torch_model, "pets")
    cluster = postgres_cluster()
    app = create_app(replica_settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client, timeout=60)
        ready = client.get("/readyz").json()
        assert ready["serving_version"] == v1 and ready["degraded"] == []
        # LISTEN/NOTIFY carries the next version; the replica fetched it from S3 into its own cache.
        _until(lambda: client.get("/readyz").json()["dependencies"].get("feed") == "notify")
        learn_quickly(torch_model, "birds", ["robin", "crow"], seed=1)
        v2 = publish_tiny_version(publisher, torch_model, "birds")
        _until(lambda: client.get("/models").json()["serving"] == v2)
        assert (replica_settings.home / "cache" / "versions" / f"v{v2}").is_dir()

        cluster.pause()
        try:
            answered, versions, degraded_seen = 0, set(), False
            started = time.monotonic()
            while time.monotonic() - started < OUTAGE_S:
                r = client.post("/predict", json={"images": IMAGES, "top_k": 2})
                assert r.status_code == 200, r.text  # not one failed prediction
                answered += 1
                versions.add(r.json()["model_version"])
                ready = client.get("/readyz")
                assert ready.status_code == 200  # no flapping: stays in the load balancer
                degraded_seen = degraded_seen or ready.json()["degraded"] == ["registry"]
            assert answered > 10 and versions == {v2} and degraded_seen
            write = client.post(f"/models/{v1}/activate", headers=auth(ADMIN))
            assert write.status_code == 503, write.text
            assert write.json()["error"]["type"] == "registry_unavailable" and int(write.headers["Retry-After"]) > 0
            assert "127.0.0.1" not in write.json()["error"]["message"]  # the cause is logged, not answered
        finally:
            cluster.start()

        # Back by itself: the watcher reads the registry again, admin writes work, the feed reconnects.
        _until(lambda: client.get("/readyz").json()["degraded"] == [])
        _until(lambda: client.post(f"/models/{v1}/activate", headers=auth(ADMIN)).status_code == 200)
        _until(lambda: client.get("/models").json()["serving"] == v1)
        _until(lambda: client.get("/readyz").json()["dependencies"].get("feed") == "notify")
        learn_quickly(torch_model, "fish", ["carp", "eel"], seed=2)
        v3 = publish_tiny_version(publisher, torch_model, "fish")
        _until(lambda: client.get("/models").json()["serving"] == v3)
    publisher.close()


def test_a_malformed_registry_url_names_the_setting(tmp_path, capsys):
    from fmlora.errors import RegistryConfigError, StoreConfigError

    with pytest.raises(RegistryConfigError, match="FMLORA_REGISTRY_URL"):
        open_registry(Settings(home=tmp_path / "h", registry_url="postgresql://u@host:notaport/db"))
    with pytest.raises(StoreConfigError, match="FMLORA_STORE_URL"):
        open_registry(Settings(home=tmp_path / "h", store_url="s3://"))
