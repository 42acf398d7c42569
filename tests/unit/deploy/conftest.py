"""deploy/k8s rendered as ``kubectl apply -k`` would send it, for each overlay."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from .kustomize import build

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("example", "example-gpu")


def fill_secrets(tree: Path) -> None:
    """Do what deploy/k8s/README.md tells an operator: copy each *.env.example beside it as *.env."""
    for example in tree.glob("overlays/*/*.env.example"):
        shutil.copyfile(example, example.with_suffix(""))


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with the example Secrets filled in from the committed *.env.example files
    (never from an operator's real keys.env, which may exist in a working copy)."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("keys.env", "backends.env"))
    fill_secrets(tree)
    return tree


@pytest.fixture(scope="session")
def rendered(k8s_tree: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: build(k8s_tree / "overlays" / name) for name in OVERLAYS}
