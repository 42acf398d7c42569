"""Task uploads: folders zipped on the fly (hidden files out, stable order), archives passed through."""

from __future__ import annotations

import io
import tarfile
import zipfile

import fmlora_client as fc
import httpx
import pytest
from fmlora_client._archive import open_upload

from .mock_server import multipart_parts


def _make_task(root):
    for cls, files in {"robin": ["2.png", "1.jpg"], "wren": ["a.png"]}.items():
        (root / cls).mkdir(parents=True)
        for name in files:
            (root / cls / name).write_bytes(f"{cls}/{name}".encode())
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "robin" / ".hidden.png").write_bytes(b"junk")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"junk")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "x").write_bytes(b"junk")


def test_folder_is_zipped_with_class_folders(tmp_path):
    _make_task(tmp_path / "birds")
    with open_upload(tmp_path / "birds") as upload:
        assert upload.filename == "birds.zip" and upload.content_type == "application/zip"
        data = upload.file.read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["robin/1.jpg", "robin/2.png", "wren/a.png"]
        assert archive.read("robin/2.png") == b"robin/2.png"


def test_temporary_zip_is_removed(tmp_path):
    _make_task(tmp_path / "birds")
    with open_upload(tmp_path / "birds") as upload:
        handle = upload.file
    assert handle.closed


def test_empty_folder_is_rejected(tmp_path):
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(fc.InvalidInputError, match="no files"), open_upload(tmp_path / "empty"):
        pass


@pytest.mark.parametrize(
    ("name", "ctype"),
    [("t.zip", "application/zip"), ("t.tar", "application/x-tar"), ("t.tar.gz", "application/gzip")],
)
def test_archives_pass_through(tmp_path, name, ctype):
    path = tmp_path / name
    path.write_bytes(b"archive-bytes")
    with open_upload(path) as upload:
        assert upload.filename == name and upload.content_type == ctype
        assert upload.file.read() == b"archive-bytes"


def test_archive_without_a_known_suffix_is_recognised_by_content(tmp_path):
    path = tmp_path / "upload.bin"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("robin/1.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with open_upload(path) as upload:
        assert upload.filename == "upload.bin"


def test_non_archives_and_missing_paths(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    with pytest.raises(fc.InvalidInputError, match="not a folder or an archive"), open_upload(tmp_path / "photo.png"):
        pass
    with pytest.raises(FileNotFoundError), open_upload(tmp_path / "absent"):
        pass
    with pytest.raises(fc.InvalidInputError), open_upload(12):
        pass


def test_file_objects_pass_through():
    buffer = io.BytesIO(b"zip-bytes")
    with open_upload(buffer) as upload:
        assert upload.file is buffer and upload.filename == "upload.zip"


def test_submit_sends_the_zip_as_the_archive_field(make_client, server, tmp_path):
    _make_task(tmp_path / "birds")
    server.on("POST", "/tasks", httpx.Response(202, json={"id": "t1", "status": "queued", "url": "/tasks/t1"}))
    submitted = make_client(admin_key="adm").submit_task(tmp_path / "birds", name="birds")
    assert submitted == fc.TaskSubmission(id="t1", status="queued", url="/tasks/t1")
    request = server.requests[-1]
    assert request.headers["authorization"] == "Bearer adm"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert int(request.headers["content-length"]) == len(request.read())  # streamed from a sized temp file
    parts = multipart_parts(request)
    archive = [p for p in parts if p[0] == "archive"]
    assert len(archive) == 1 and archive[0][1] == "birds.zip"
    with zipfile.ZipFile(io.BytesIO(archive[0][2])) as zipped:
        assert zipped.namelist() == ["robin/1.jpg", "robin/2.png", "wren/a.png"]
    assert {p[0]: p[2] for p in parts if p[1] is None} == {"name": b"birds", "kind": b"class"}


def test_submit_validates_its_arguments(make_client, tmp_path):
    client = make_client()
    with pytest.raises(fc.InvalidInputError):
        client.submit_task(tmp_path, name="")
    with pytest.raises(fc.InvalidInputError):
        client.submit_task(tmp_path, name="x", kind="other")
