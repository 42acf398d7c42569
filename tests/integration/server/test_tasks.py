"""POST /tasks (streamed upload, validation, idempotency) and GET /tasks, /tasks/{id}."""

from __future__ import annotations

import io
import tarfile

import pytest

from .conftest import ADMIN, assert_envelope, auth, zip_task

ADMIN_H = auth(ADMIN)


def upload(
    client,
    archive: bytes,
    name: str = "pets",
    kind: str | None = "class",
    key: str | None = None,
    filename: str = "task.zip",
):
    headers = dict(ADMIN_H)
    if key is not None:
        headers["Idempotency-Key"] = key
    data = {"name": name} if kind is None else {"name": name, "kind": kind}
    return client.post("/tasks", files={"archive": (filename, archive, "application/zip")}, data=data, headers=headers)


@pytest.fixture
def client(make_client):
    return make_client()


def test_upload_is_stored_queued_and_readable(client, registry):
    r = upload(client, zip_task({"cat": 5, "dog": 5}))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["url"] == f"/tasks/{body['id']}"
    assert r.headers["location"] == body["url"]
    assert "idempotent-replayed" not in r.headers
    task = client.get(body["url"]).json()
    assert task["name"] == "pets" and task["kind"] == "class" and task["status"] == "queued"
    assert sorted(task["classes"]) == ["cat", "dog"] and task["num_train"] + task["num_eval"] == 10
    assert {"progress", "metrics", "version", "error"} <= set(task)
    assert registry.get_task(body["id"]).name == "pets"
    listing = client.get("/tasks").json()
    assert [t["id"] for t in listing["tasks"]] == [body["id"]]
    assert client.get("/tasks", params={"status": "live"}).json() == {"tasks": []}
    assert "fmlora_tasks_submitted_total 1.0" in client.get("/metrics").text


def test_kind_defaults_to_class(client):
    r = upload(client, zip_task({"a": 3, "b": 3}), kind=None)
    assert r.status_code == 202
    assert client.get(r.headers["location"]).json()["kind"] == "class"


def test_tar_archives_are_accepted(client):
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(zip_task({"x": 3, "y": 3}))) as zf, tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in zf.namelist():
            data = zf.read(name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = upload(client, buf.getvalue(), name="tarred", filename="t.tar.gz")
    assert r.status_code == 202, r.text


def test_same_idempotency_key_returns_the_same_task_with_200(client, registry):
    archive = zip_task({"cat": 4, "dog": 4})
    first = upload(client, archive, key="retry-1")
    again = upload(client, archive, key="retry-1")
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert len(registry.list_tasks()) == 1


def test_reusing_a_key_for_another_task_is_409(client):
    upload(client, zip_task({"cat": 4, "dog": 4}), key="k-1")
    r = upload(client, zip_task({"fish": 4, "eel": 4}), name="sea", key="k-1")
    assert_envelope(r, 409, "task_conflict")


@pytest.mark.parametrize("key", ["", "has space", "x" * 201, "caf\u00e9"])
def test_bad_idempotency_keys_are_422(client, key):
    headers = {**ADMIN_H, "Idempotency-Key": key.encode("utf-8")}
    r = client.post(
        "/tasks", files={"archive": ("a.zip", zip_task({"a": 3, "b": 3}))}, data={"name": "n"}, headers=headers
    )
    assert_envelope(r, 422, "validation_error")


def test_taken_name_is_409(client):
    assert upload(client, zip_task({"cat": 4, "dog": 4})).status_code == 202
    assert_envelope(upload(client, zip_task({"owl": 4, "emu": 4})), 409, "task_conflict")


def test_known_classes_in_a_class_task_are_422_and_nothing_is_stored(client, registry):
    assert upload(client, zip_task({"cat": 4, "dog": 4})).status_code == 202
    r = upload(client, zip_task({"cat": 4, "owl": 4}), name="again")
    assert_envelope(r, 422, "invalid_class_layout")
    assert len(registry.list_tasks()) == 1


def test_not_an_archive_is_415(client):
    r = upload(client, b"definitely not a zip file" * 10)
    assert_envelope(r, 415, "unsupported_archive")


def test_unsafe_archive_is_422(client):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil/0.png", b"x")
        zf.writestr("cat/0.png", b"x")
    assert_envelope(upload(client, buf.getvalue()), 422, "unsafe_archive")


def test_undecodable_image_in_archive_is_422(client):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_task({"cat": 3, "dog": 3}))) as src, zipfile.ZipFile(buf, "w") as zf:
        for name in src.namelist():
            zf.writestr(name, src.read(name))
        zf.writestr("dog/broken.png", b"\x89PNG broken")
    assert_envelope(upload(client, buf.getvalue()), 422, "invalid_archive_image")


def test_archive_over_the_limit_is_413(make_client):
    client = make_client(max_archive_bytes=4096)
    big = zip_task({"cat": 40, "dog": 40}, size=16)
    assert len(big) > 4096
    r = upload(client, big + b"\0" * (2 << 20))  # past the streaming limit (archive limit + 1 MiB)
    assert_envelope(r, 413, "payload_too_large")
    r = upload(client, big)  # under the body limit, over the archive limit
    assert_envelope(r, 413, "archive_too_large")


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": b"name=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415),
        ({"json": {"name": "x"}}, 415),
        ({"data": {"name": "x"}, "files": {"other": ("a.bin", b"123")}}, 422),
        ({"files": {"archive": ("a.zip", b"PK")}}, 422),
        ({"files": {"archive": ("a.zip", b"PK")}, "data": {"name": "x", "kind": "other"}}, 422),
        ({"files": {"archive": ("a.zip", b"PK")}, "data": {"name": "x", "colour": "red"}}, 422),
        ({"files": [("archive", ("a.zip", b"PK")), ("archive", ("b.zip", b"PK"))], "data": {"name": "x"}}, 413),
    ],
    ids=["urlencoded", "json", "no-archive", "no-name", "bad-kind", "extra-field", "two-archives"],
)
def test_bad_upload_requests(client, kwargs, status):
    kwargs["headers"] = {**ADMIN_H, **kwargs.get("headers", {})}
    r = client.post("/tasks", **kwargs)
    assert_envelope(r, status)


def test_unknown_task_is_404_and_bad_queries_422(client):
    assert_envelope(client.get("/tasks/0123456789abcdef"), 404, "task_not_found")
    assert_envelope(client.get("/tasks", params={"limit": 0}), 422, "validation_error")
    assert_envelope(client.get("/tasks", params={"status": "sleeping"}), 422, "validation_error")
