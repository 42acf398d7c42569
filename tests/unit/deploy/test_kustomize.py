"""The small kustomize in kustomize.py renders what kustomize does, and refuses what it does not implement."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import OVERLAYS
from .kustomize import Unsupported, build, content_hash, parse_env_file


def _key(doc: dict) -> tuple[str, str | None, str]:
    return doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_what_kubectl_kustomize_renders(k8s_tree, overlay):
    """Where kubectl is installed, its built-in kustomize is the reference: the same objects, field for
    field, generated names (content hashes) included."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the hash and rendering rules are also pinned by the tests below)")
    result = subprocess.run(
        [kubectl, "kustomize", str(k8s_tree / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    theirs = {_key(d): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = {_key(d): d for d in build(k8s_tree / "overlays" / overlay)}
    assert ours == theirs


def test_content_hash_matches_kustomize():
    # Vectors from kustomize's api/hasher tests, and one checked against kubectl 1.32 (kustomize v5.5):
    # `configMapGenerator: [{name: x, literals: [a=b]}]` renders ConfigMap x-4h2mbtbbt6.
    assert content_hash({"kind": "ConfigMap", "metadata": {"name": "any"}, "data": {"one": ""}}) == "9g67k2htb6"
    assert content_hash({"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}) == "4h2mbtbbt6"
    secret = {"kind": "Secret", "type": "Opaque", "metadata": {"name": "s"}, "data": {"a": "Yg=="}}
    assert content_hash(secret) != content_hash({**secret, "type": "kubernetes.io/tls"}), "the type counts"


def test_generators_merge_hash_and_rename_references(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text(
        "resources: [deploy.yaml]\nconfigMapGenerator:\n- name: cfg\n  literals: [A=1]\n"
    )
    (base / "deploy.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, labels: {app: d}}\n"
        "spec:\n  template:\n    spec:\n      containers:\n      - name: c\n        image: img:1\n"
        "        envFrom: [{configMapRef: {name: cfg}}]\n"
        "        env: [{name: K, valueFrom: {secretKeyRef: {name: sec, key: K}}}]\n"
    )
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "k.env").write_text("# a comment\n\nK=a value with spaces # not a comment\n")
    (overlay / "kustomization.yaml").write_text(
        "namespace: ns\nresources: [../base]\n"
        "images: [{name: img, newName: reg.example/img, newTag: '2'}]\n"
        "configMapGenerator:\n- name: cfg\n  behavior: merge\n  literals: [B=2]\n"
        "secretGenerator:\n- name: sec\n  envs: [k.env]\n"
        "patches:\n- target: {kind: Deployment, labelSelector: app=d}\n"
        "  patch: '[{op: add, path: /spec/replicas, value: 3}]'\n"
    )
    docs = {d["kind"]: d for d in build(overlay)}
    config, secret, deployment = docs["ConfigMap"], docs["Secret"], docs["Deployment"]
    assert config["data"] == {"A": "1", "B": "2"}
    assert config["metadata"]["name"] == f"cfg-{content_hash(config)}"
    assert secret["data"] == {"K": "YSB2YWx1ZSB3aXRoIHNwYWNlcyAjIG5vdCBhIGNvbW1lbnQ="}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert container["image"] == "reg.example/img:2"
    assert deployment["spec"]["replicas"] == 3
    assert {d["metadata"]["namespace"] for d in docs.values()} == {"ns"}


def test_long_secret_values_wrap_like_kustomize(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("secretGenerator:\n- name: s\n  literals: [K=" + "x" * 60 + "]\n")
    (doc,) = build(tmp_path)
    lines = doc["data"]["K"].split("\n")
    assert [len(line) for line in lines] == [70, 10, 0], "70-character lines, each ended by a newline"


@pytest.mark.parametrize(
    "kustomization",
    [
        "namePrefix: x-\n",
        "commonLabels: {a: b}\n",
        "configMapGenerator:\n- name: c\n  files: [f]\n",
        "resources: [d.yaml]\npatches:\n- target: {kind: Deployment}\n  patch: 'spec: {replicas: 2}'\n",
        "resources: [d.yaml]\npatches:\n- target: {kind: Deployment, labelSelector: 'a in (b)'}\n  patch: '[]'\n",
        "resources: [d.yaml]\npatches:\n- target: {kind: Deployment, annotationSelector: a=b}\n  patch: '[]'\n",
    ],
)
def test_refuses_what_it_does_not_implement(tmp_path, kustomization):
    (tmp_path / "d.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n")
    (tmp_path / "kustomization.yaml").write_text(kustomization)
    with pytest.raises(Unsupported):
        build(tmp_path)


def test_a_patch_that_selects_nothing_fails(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "patches:\n- target: {kind: Deployment, name: gone}\n  patch: '[{op: remove, path: /spec}]'\n"
    )
    with pytest.raises(ValueError, match="selects nothing"):
        build(tmp_path)


def test_env_files_read_like_kustomize():
    assert parse_env_file("\ufeffA=1\n  # c\n\n  B=x \n") == [("A", "1"), ("B", "x ")]
    assert parse_env_file("A=1\n  B=x=y # kept\n") == [("A", "1"), ("B", "x=y # kept")]
    with pytest.raises(Unsupported, match="no '='"):
        parse_env_file("FROM_MY_SHELL\n")
    with pytest.raises(ValueError, match="not a valid variable name"):
        parse_env_file("1A=x\n")


def test_missing_secret_files_fail_loudly(tmp_path):
    """Applied without keys.env / backends.env, the overlay fails instead of running with no keys."""
    tree = tmp_path / "k8s"
    shutil.copytree(Path(__file__).resolve().parents[3] / "deploy" / "k8s", tree)
    for env in tree.glob("overlays/example/*.env"):
        if env.name != "config.env":
            env.unlink()
    with pytest.raises(FileNotFoundError, match=r"keys\.env"):
        build(tree / "overlays" / "example")
