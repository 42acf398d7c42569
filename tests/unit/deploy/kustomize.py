"""Enough of ``kustomize build`` to render deploy/k8s, and loud about everything else.

kustomize is not installed where the tests run (``kubectl kustomize`` may be; test_kustomize.py compares
the two where it is). This renders what deploy/k8s uses, the way kustomize v5 does it:

- ``resources``: YAML files and folders holding a kustomization (built first, recursively);
- ``configMapGenerator`` / ``secretGenerator`` from ``envs`` files and ``literals``, with ``behavior``
  create, merge or replace, and kustomize's content-hash name suffix (computed once, on the final data,
  at the end of the top-level build), with references to the generated names rewritten in pod specs;
- ``patches`` holding JSON 6902 operations (inline or in a file), with targets selected by group,
  version, kind, name and equality label selectors;
- ``namespace`` and ``images`` (newName, newTag, digest).

A kustomization key, generator field, target selector or patch form outside that list raises
``Unsupported``, so a manifest change that needs more of kustomize fails here instead of being rendered
wrongly.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

__all__ = ["Unsupported", "build", "content_hash", "parse_env_file"]

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "patches",
}
GENERATOR_KEYS = {"name", "envs", "literals", "behavior", "type"}
TARGET_KEYS = {"group", "version", "kind", "name", "labelSelector"}
IMAGE_KEYS = {"name", "newName", "newTag", "digest"}
# Kinds without a namespace among those a deployment like ours could hold.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement."""


@dataclass
class _Resource:
    body: dict[str, Any]
    generated: bool = False  # gets the content-hash suffix at the end
    original_name: str = field(default="")

    def __post_init__(self) -> None:
        self.original_name = self.original_name or self.body["metadata"]["name"]

    @property
    def kind(self) -> str:
        return self.body["kind"]


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """KEY=VALUE lines as kustomize reads them: leading blanks trimmed, blank and # lines skipped, the
    value taken verbatim up to the end of the line (so no trailing comments)."""
    pairs = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.removeprefix("\ufeff") if number == 1 else raw
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise Unsupported(f"line {number}: {key!r} has no '=' (kustomize would read it from its own environment)")
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"line {number}: {key!r} is not a valid variable name")
        pairs.append((key, value))
    return pairs


def _literal(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"literal {text!r} is not KEY=VALUE")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key, value


def _go_json(value: Any) -> str:
    """json.Marshal of Go: sorted keys, no spaces, <, > and & escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028")):
        text = text.replace(char, escaped)
    return text.replace("\u2029", "\\u2029")


def content_hash(body: dict[str, Any]) -> str:
    """kustomize's name suffix for a generated ConfigMap or Secret (api/hasher): the sha256 of a JSON
    encoding of kind, type and data; its first 10 hex digits with 0 1 3 a e swapped for letters so that
    it never reads as a number. The encoding has a "name" too, which kustomize always leaves empty: it
    looks the name up as the single key "metadata/name", which no object has."""
    encoded: dict[str, Any] = {"kind": body["kind"], "name": "", "data": body.get("data", {})}
    if body["kind"] == "Secret":
        encoded["type"] = body.get("type", "Opaque")
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
            raise ValueError(f"{path}: not a Kubernetes object: {str(doc)[:80]}")
    return docs


def _generate(kind: str, spec: dict[str, Any], root: Path) -> tuple[str, dict[str, str]]:
    unknown = set(spec) - GENERATOR_KEYS
    if unknown:
        raise Unsupported(f"{kind} generator {spec.get('name')}: {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in spec.get("envs", []):
        data.update(parse_env_file((root / env).read_text(encoding="utf-8")))
    for literal in spec.get("literals", []):
        key, value = _literal(literal)
        data[key] = value
    return spec.get("behavior", "create"), data


def _base64(value: str) -> str:
    """A Secret value as kustomize writes it (kyaml's encodeBase64): base64 in lines of 70 characters,
    each ended by a newline once there is more than one line's worth."""
    encoded = base64.b64encode(value.encode()).decode()
    if len(encoded) < 70:
        return encoded
    return "".join(encoded[i : i + 70] + "\n" for i in range(0, len(encoded), 70))


def _encode(kind: str, data: dict[str, str]) -> dict[str, str]:
    if kind == "ConfigMap":
        return dict(data)
    return {k: _base64(v) for k, v in data.items()}


def _apply_generators(kustomization: dict[str, Any], root: Path, resources: list[_Resource]) -> None:
    for key, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for spec in kustomization.get(key, []):
            behavior, data = _generate(kind, spec, root)
            name = spec["name"]
            existing = [r for r in resources if r.kind == kind and r.original_name == name]
            if behavior == "create":
                if existing:
                    raise ValueError(f"{kind} {name} is generated twice; use behavior: merge")
                body: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
                if kind == "Secret":
                    body["type"] = spec.get("type", "Opaque")
                body["data"] = _encode(kind, data)
                resources.append(_Resource(body, generated=True))
            elif behavior in ("merge", "replace"):
                if len(existing) != 1:
                    raise ValueError(f"{kind} {name}: behavior {behavior} needs exactly one to {behavior} with")
                target = existing[0].body
                if behavior == "replace":
                    target["data"] = {}
                target.setdefault("data", {}).update(_encode(kind, data))
            else:
                raise Unsupported(f"{kind} {name}: behavior {behavior!r}")


def _matches(resource: _Resource, target: dict[str, Any]) -> bool:
    unknown = set(target) - TARGET_KEYS
    if unknown:
        raise Unsupported(f"patch target selector {sorted(unknown)}")
    api = resource.body["apiVersion"]
    group, _, version = api.rpartition("/")
    checks = {"group": group, "version": version, "kind": resource.kind}
    for key, actual in checks.items():
        if key in target and target[key] != actual:
            return False
    if "name" in target and not re.fullmatch(target["name"], resource.original_name):
        return False
    if "labelSelector" in target:
        labels = resource.body["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            key, sep, value = term.strip().partition("=")
            if not sep or value.startswith("=") or key.endswith("!"):
                raise Unsupported(f"label selector {term!r}: only key=value terms are implemented")
            if labels.get(key) != value:
                return False
    return True


def _apply_patches(kustomization: dict[str, Any], root: Path, resources: list[_Resource]) -> None:
    for spec in kustomization.get("patches", []):
        if set(spec) - {"target", "patch", "path"} or ("patch" in spec) == ("path" in spec):
            raise Unsupported(f"patch {spec}: need a target and exactly one of patch or path")
        text = spec["patch"] if "patch" in spec else (root / spec["path"]).read_text()
        operations = yaml.safe_load(text)
        if not isinstance(operations, list):
            raise Unsupported("strategic-merge patches are not implemented; write JSON 6902 operations")
        patch = jsonpatch.JsonPatch(operations)
        selected = [r for r in resources if _matches(r, spec["target"])]
        if not selected:
            raise ValueError(f"patch target {spec['target']} selects nothing")
        for resource in selected:
            resource.body = patch.apply(resource.body)


def _pod_spec(body: dict[str, Any]) -> dict[str, Any] | None:
    spec = body.get("spec", {})
    if body["kind"] == "Pod":
        return spec
    if body["kind"] == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _set_namespace(namespace: str, resources: list[_Resource]) -> None:
    for resource in resources:
        if resource.kind == "Namespace":
            if resource.body["metadata"]["name"] != namespace:
                raise Unsupported(f"renaming Namespace {resource.body['metadata']['name']} to {namespace}")
        elif resource.kind in CLUSTER_SCOPED:
            continue
        else:
            resource.body["metadata"]["namespace"] = namespace


def _split_image(image: str) -> tuple[str, str]:
    """(name, the rest: ':tag', '@digest' or both) of an image reference; a registry port is no tag."""
    at = image.find("@")
    name, digest = (image[:at], image[at:]) if at >= 0 else (image, "")
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon:] + digest
    return name, digest


def _set_images(images: list[dict[str, Any]], resources: list[_Resource]) -> None:
    for entry in images:
        if set(entry) - IMAGE_KEYS:
            raise Unsupported(f"images entry {entry}")
        for resource in resources:
            pod = _pod_spec(resource.body)
            for container in _containers(pod or {}):
                name, rest = _split_image(container["image"])
                if name != entry["name"]:
                    continue
                if "newTag" in entry or "digest" in entry:
                    rest = f"@{entry['digest']}" if "digest" in entry else f":{entry['newTag']}"
                container["image"] = entry.get("newName", name) + rest


def _references(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(kind, the object holding the name, the key of the name) of each ConfigMap and Secret reference."""
    for container in _containers(pod):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"], "name"
            if "secretRef" in source:
                yield "Secret", source["secretRef"], "name"
        for env in container.get("env", []):
            value_from = env.get("valueFrom", {})
            if "configMapKeyRef" in value_from:
                yield "ConfigMap", value_from["configMapKeyRef"], "name"
            if "secretKeyRef" in value_from:
                yield "Secret", value_from["secretKeyRef"], "name"
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"], "name"
        if "secret" in volume:
            yield "Secret", volume["secret"], "secretName"
        if "projected" in volume:
            raise Unsupported("projected volumes")
    for secret in pod.get("imagePullSecrets", []):
        yield "Secret", secret, "name"


def _build(root: Path) -> list[_Resource]:
    path = root / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"{path}: {sorted(unknown)}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise Unsupported(f"{path}: kind {kustomization['kind']}")
    resources: list[_Resource] = []
    for entry in kustomization.get("resources", []):
        target = (root / entry).resolve()
        if target.is_dir():
            resources.extend(_build(target))
        else:
            resources.extend(_Resource(doc) for doc in _load_yaml_documents(target))
    _apply_generators(kustomization, root, resources)
    _apply_patches(kustomization, root, resources)
    if "namespace" in kustomization:
        _set_namespace(kustomization["namespace"], resources)
    _set_images(kustomization.get("images", []), resources)
    return resources


def build(root: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build root`` prints (in the order of the kustomization, not kustomize's)."""
    resources = _build(Path(root))
    renamed: dict[tuple[str, str], str] = {}
    for resource in resources:
        if resource.generated:
            name = f"{resource.original_name}-{content_hash(resource.body)}"
            resource.body["metadata"]["name"] = name
            renamed[(resource.kind, resource.original_name)] = name
    for resource in resources:
        pod = _pod_spec(resource.body)
        for kind, holder, key in _references(pod or {}):
            holder[key] = renamed.get((kind, holder[key]), holder[key])
    keys = [(r.kind, r.body["metadata"].get("namespace"), r.body["metadata"]["name"]) for r in resources]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise ValueError(f"objects defined twice: {sorted(map(str, duplicates))}")
    return [copy.deepcopy(r.body) for r in resources]
