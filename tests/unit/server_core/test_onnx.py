"""ONNX export and the ONNX Runtime backend: one graph for every version, outputs equal torch's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from fmlora.errors import UnknownTaskError
from fmlora.export.onnx import adapter_feeds, prompt_indices
from server.core.backends.onnx import OnnxBackend
from tests.conftest import random_images, tiny_config
from tests.helpers import learn_quickly
from tests.unit.server_core.conftest import image, seeded_model

PROMPTS = ["auto", "none", {"task": "a"}, {"task": "b"}, {"task": "c"}, "auto"]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported once for the module: every backend and engine below finds the graph in this cache."""
    path = tmp_path_factory.mktemp("onnx")
    OnnxBackend(seeded_model(tiny_config()), cache_dir=path).close()
    return path


def known_prompts(model) -> list:
    """PROMPTS with tasks the model has not learned yet replaced by 'auto'."""
    names = {t.name for t in model.tasks}
    return [p if not isinstance(p, dict) or p["task"] in names else "auto" for p in PROMPTS]


def test_one_graph_serves_every_version_within_1e_4(onnx_dir):
    backend = OnnxBackend(seeded_model(tiny_config()), cache_dir=onnx_dir)
    assert len(list(onnx_dir.glob("*.onnx"))) == 1  # the cached graph was reused, not exported again
    reference = seeded_model(tiny_config()).eval()
    x = reference.preprocessor(random_images(len(PROMPTS), seed=4))
    # Versions with 1, 2 and 3 tasks and 2, 3 and 6 classes: the same graph, other feeds.
    for step, (name, classes) in enumerate([("a", ["x", "y"]), ("b", ["z"]), ("c", ["u", "v", "w"])]):
        learn_quickly(reference, name, classes, seed=step)
        prompts = known_prompts(reference)
        feeds = adapter_feeds(reference, reference.adapter_tensors())
        feeds["images"] = x.numpy()
        feeds["prompt_index"] = prompt_indices(prompts, [t.name for t in reference.tasks])
        logits, query = backend.session.run(["logits", "query"], feeds)
        with torch.no_grad():
            expected = reference.forward_detailed(x, prompts)
        assert logits.shape == (len(PROMPTS), len(reference.labels))
        np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(query, expected.query.numpy(), atol=1e-4, rtol=0)
    # A merged torch model gives the same answers too (the engine's default).
    reference.merge()
    with torch.no_grad():
        merged = reference.forward_detailed(x, known_prompts(reference)).logits.numpy()
    np.testing.assert_allclose(logits, merged, atol=1e-4, rtol=0)
    backend.close()


def test_prompt_indices():
    assert prompt_indices(["auto", "none", {"task": "b"}], ["a", "b"]).tolist() == [-1, -2, 1]
    with pytest.raises(UnknownTaskError):
        prompt_indices([{"task": "zzz"}], ["a"])


def test_onnx_engine_equals_the_torch_engine(publisher, make_engine, onnx_dir):
    v1 = publisher.learn_and_publish("a", ["x", "y"])
    v2 = publisher.learn_and_publish("b", ["z", "w", "q"])
    torch_engine = make_engine(backend="torch")
    onnx_engine = make_engine(backend="onnx", onnx_dir=str(onnx_dir))
    assert onnx_engine.describe()["backend"] == "onnx" and onnx_engine.serving_version == v2
    images = [image(i, (20 + i, 40)) for i in range(4)]
    for prompt in ("auto", "none", {"task": "a"}, {"task": "b"}):
        for version in (None, v1):
            if version == v1 and prompt == {"task": "b"}:
                continue
            a = asyncio.run(torch_engine.predict(images, top_k=5, prompt=prompt, version=version))
            b = asyncio.run(onnx_engine.predict(images, top_k=5, prompt=prompt, version=version))
            assert a.model_version == b.model_version and a.snapshot_sha256 == b.snapshot_sha256
            for ra, rb in zip(a.results, b.results, strict=True):
                sa = {p["label"]: p["score"] for p in ra.predictions}
                sb = {p["label"]: p["score"] for p in rb.predictions}
                assert sa.keys() == sb.keys()
                assert all(abs(sa[k] - sb[k]) <= 1e-4 for k in sa)
                assert ra.prompt["mode"] == rb.prompt["mode"] and ra.prompt["task"] == rb.prompt["task"]
                for task, weight in ra.prompt["weights"].items():
                    assert abs(rb.prompt["weights"][task] - weight) <= 1e-4
    # Switching versions in the ONNX backend is a different feed dictionary: no export, no copy.
    assert len(list(onnx_dir.glob("*.onnx"))) == 1
    assert onnx_engine.stats()["adapter_switches_total"] >= 2
