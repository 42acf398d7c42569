"""The engine on a tiny model and a real registry: predictions, prompts, swaps, pinning, bad snapshots."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import numpy as np
import pytest
import torch

from fmlora.errors import PromptError, UnknownTaskError, VersionNotFoundError
from fmlora.model import FMLoRAModel, PromptConfig, load_snapshot
from server.core.backends.torch import TorchBackend
from server.core.engine import Engine, EngineConfig
from server.core.errors import (
    InvalidImageInput,
    InvalidRequestError,
    NoModelError,
    NotReadyError,
    VersionUnavailableError,
)
from server.core.images import prepare_image
from server.core.watcher import VersionSource
from tests.conftest import TINY_RANDOM, tiny_config
from tests.unit.server_core.conftest import Publisher, image, seeded_model


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def reference_probs(publisher: Publisher, version: int, images: list[np.ndarray], prompt: object = "auto"):
    """What the version computes alone: a fresh model, the snapshot, the training preprocessing."""
    model = seeded_model(publisher.config).eval()
    load_snapshot(model, publisher.registry.snapshot_dir(version))
    size = model.preprocessor.input_size
    arrays = np.stack([prepare_image(im, size, model.preprocessor.crop_pct) for im in images])
    x = model.preprocessor(torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous())
    with torch.no_grad():
        return model(x, prompt).softmax(-1), model.labels


def test_ready_without_a_live_version_but_predict_is_503(make_engine):
    engine = make_engine()
    assert engine.ready and engine.serving_version is None and engine.serving is None
    with pytest.raises(NoModelError) as info:
        asyncio.run(engine.predict([image(0)]))
    assert info.value.status_code == 503 and info.value.retry_after


def test_predict_before_start_and_after_stop_is_not_ready(publisher):
    engine = Engine(publisher.registry, EngineConfig(device="cpu"), model=seeded_model(publisher.config))
    with pytest.raises(NotReadyError):
        asyncio.run(engine.predict([image(0)]))
    engine.start()
    engine.stop(2)
    with pytest.raises(NotReadyError):
        asyncio.run(engine.predict([image(0)]))


def test_predictions_equal_the_version_run_alone(publisher, make_engine):
    v1 = publisher.learn_and_publish("digits", ["one", "two", "three"])
    engine = make_engine()
    assert engine.serving_version == v1 and engine.serving.labels == ("one", "two", "three")
    images = [image(1), image(2, (50, 17)), image(3, (1, 1))]
    prediction = asyncio.run(engine.predict(images, top_k=3))
    assert prediction.model_version == v1
    assert prediction.snapshot_sha256 == publisher.registry.get_version(v1).sha256
    probs, labels = reference_probs(publisher, v1, images)
    for row, result in enumerate(prediction.results):
        assert [p["task"] for p in result.predictions] == ["digits"] * 3
        got = {p["label"]: p["score"] for p in result.predictions}
        expected = {label: float(probs[row, j]) for j, label in enumerate(labels)}
        assert got.keys() == expected.keys()
        for label in got:
            assert got[label] == pytest.approx(expected[label], abs=1e-5)
        scores = [p["score"] for p in result.predictions]
        assert scores == sorted(scores, reverse=True)
    # top_k larger than the label count is clipped; smaller is honoured
    assert len(asyncio.run(engine.predict([image(1)], top_k=10)).results[0].predictions) == 3
    assert len(engine.predict_sync([image(1)], top_k=1).results[0].predictions) == 1


def test_prompt_modes_and_reported_meta_prompt(publisher, make_engine):
    publisher.learn("animals", ["cat", "dog"])
    publisher.learn_and_publish("vehicles", ["car", "bus"])
    engine = make_engine()
    img = [image(5)]
    auto = asyncio.run(engine.predict(img, prompt="auto")).results[0].prompt
    assert auto["mode"] == "auto" and auto["task"] in ("animals", "vehicles")
    assert set(auto["weights"]) == {"animals", "vehicles"}
    assert sum(auto["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert auto["task"] == max(auto["weights"], key=auto["weights"].get)
    named = asyncio.run(engine.predict(img, prompt={"task": "animals"})).results[0].prompt
    assert named["mode"] == "task" and named["task"] == "animals"
    assert max(named["weights"], key=named["weights"].get) == "animals"
    none = asyncio.run(engine.predict(img, prompt="none")).results[0].prompt
    assert none == {"mode": "none", "task": None, "weights": {}}
    # Each prompt mode gives exactly what the model computes alone with that prompt.
    for prompt in ("auto", "none", {"task": "animals"}, {"task": "vehicles"}):
        result = asyncio.run(engine.predict(img, top_k=4, prompt=prompt)).results[0]
        probs, labels = reference_probs(publisher, engine.serving_version, img, prompt)
        for p in result.predictions:
            assert p["score"] == pytest.approx(float(probs[0, labels.index(p["label"])]), abs=1e-5)


def test_request_errors(publisher, make_engine):
    publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = make_engine()
    with pytest.raises(UnknownTaskError, match="known: animals"):
        asyncio.run(engine.predict([image(0)], prompt={"task": "plants"}))
    with pytest.raises(PromptError):
        asyncio.run(engine.predict([image(0)], prompt="sometimes"))
    with pytest.raises(InvalidRequestError):
        asyncio.run(engine.predict([image(0)], top_k=0))
    with pytest.raises(InvalidRequestError):
        asyncio.run(engine.predict([]))
    with pytest.raises(InvalidImageInput, match="image 1"):
        asyncio.run(engine.predict([image(0), np.zeros((4, 4, 3), dtype=np.float32)]))
    for missing in (99, 0, -1, 2**63, 10**30):
        with pytest.raises(VersionNotFoundError):
            asyncio.run(engine.predict([image(0)], version=missing))


def test_mixed_prompts_in_one_batch_do_not_interfere(publisher, make_engine):
    """Concurrent requests with different prompts share batches; each gets its own prompt's answer,
    and a request naming an unknown task fails alone (validated before batching)."""
    publisher.learn("animals", ["cat", "dog"])
    publisher.learn_and_publish("vehicles", ["car", "bus"])
    engine = make_engine(max_wait_ms=50.0)
    prompts = ["auto", "none", {"task": "animals"}, {"task": "nope"}, {"task": "vehicles"}]

    async def main():
        return await asyncio.gather(
            *(engine.predict([image(7)], top_k=4, prompt=p) for p in prompts), return_exceptions=True
        )

    results = asyncio.run(main())
    assert isinstance(results[3], UnknownTaskError)
    assert engine.stats()["batches_total"] < 4  # they were batched together
    for prompt, prediction in zip(prompts, results, strict=True):
        if prompt == {"task": "nope"}:
            continue
        probs, labels = reference_probs(publisher, engine.serving_version, [image(7)], prompt)
        for p in prediction.results[0].predictions:
            assert p["score"] == pytest.approx(float(probs[0, labels.index(p["label"])]), abs=1e-5)


def test_swaps_are_atomic_under_a_concurrent_stream(publisher, make_engine):
    """While the live version flips between v1 and v2, every answer equals what its version computes
    alone: no batch ever mixes versions or sees a half-loaded adapter."""
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    v2 = publisher.learn_and_publish("vehicles", ["car", "bus", "van"])
    engine = make_engine(max_wait_ms=1.0, max_batch_size=4)
    imgs = [image(10 + i) for i in range(4)]
    refs = {v: reference_probs(publisher, v, imgs) for v in (v1, v2)}
    stop = threading.Event()
    flips = []

    def flipper() -> None:
        version = v1
        while not stop.is_set():
            publisher.registry.activate(version)
            flips.append(version)
            version = v2 if version == v1 else v1
            time.sleep(0.03)

    async def client(index: int) -> list:
        out = []
        while not stop.is_set():
            prediction = await engine.predict([imgs[index]], top_k=5)
            out.append((index, prediction))
        return out

    async def main() -> list:
        thread = threading.Thread(target=flipper)
        thread.start()
        try:
            tasks = [asyncio.ensure_future(client(i)) for i in range(4)]
            await asyncio.sleep(1.2)
        finally:
            stop.set()
            thread.join()
        return [item for chunk in await asyncio.gather(*tasks) for item in chunk]

    answers = asyncio.run(main())
    seen = {p.model_version for _, p in answers}
    assert seen == {v1, v2}, "the stream should have crossed several swaps"
    assert engine.stats()["swaps_total"] >= 4
    for index, prediction in answers:
        probs, labels = refs[prediction.model_version]
        result = prediction.results[0]
        assert {p["label"] for p in result.predictions} == set(labels)
        for p in result.predictions:
            assert p["score"] == pytest.approx(float(probs[index, labels.index(p["label"])]), abs=1e-5)


def test_bad_snapshots_are_refused_counted_and_not_retried(publisher, make_engine):
    good = publisher.learn_and_publish("animals", ["cat", "dog"])
    swaps: list[tuple[bool, int | None]] = []
    engine = make_engine()
    engine.on_swap(lambda ok, seconds, version: swaps.append((ok, version)))
    assert engine.serving_version == good

    corrupt = publisher.publish(tamper=publisher.corrupt)
    truncated = publisher.publish(tamper=publisher.truncate)
    # Incompatible: a snapshot trained on another backbone (different weights, same layout).
    other = seeded_model(publisher.config, seed=1)
    publisher_other = Publisher.__new__(Publisher)
    publisher_other.__dict__.update(publisher.__dict__, trainer=other, next_task=0)
    publisher_other.learn("animals", ["cat", "dog"])
    incompatible = publisher_other.publish()
    # Finite tensors whose outputs overflow: refused by the warm-up.
    blown = seeded_model(publisher.config)
    load_snapshot(blown, publisher.registry.snapshot_dir(good))
    with torch.no_grad():
        blown.head.frozen_weight.fill_(3e38)
    overflow = publisher.publish(blown)

    for bad in (corrupt, truncated, incompatible, overflow):
        if publisher.registry.live_version() != bad:
            publisher.registry.activate(bad)
        wait_for(lambda bad=bad: engine.stats()["versions"]["failed_versions"].get(bad) is not None)
        # Good traffic keeps flowing on the good version.
        assert asyncio.run(engine.predict([image(1)])).model_version == good
    stats = engine.stats()
    assert stats["swaps_failed"] == 4 and engine.serving_version == good
    assert set(stats["versions"]["failed_versions"]) == {corrupt, truncated, incompatible, overflow}
    assert stats["versions"]["failed_versions"][overflow]["error"] == "SnapshotWarmupError"
    assert [ok for ok, _ in swaps] == [False] * 4
    loads_failed = stats["versions"]["loads_failed"]
    time.sleep(0.2)  # ten polls: the live pointer still names a bad version, which is not retried
    assert engine.stats()["versions"]["loads_failed"] == loads_failed
    # Pinning a bad version is a clear refusal, not a 500.
    with pytest.raises(VersionUnavailableError):
        asyncio.run(engine.predict([image(1)], version=corrupt))
    # Rolling back to the good one is instant and counted as a swap.
    publisher.registry.activate(good)
    assert engine.reload() == good
    assert asyncio.run(engine.predict([image(1)])).model_version == good


def test_pinning_an_older_version_and_eviction(publisher, make_engine):
    versions = [publisher.learn_and_publish(f"task{i}", [f"c{i}a", f"c{i}b"]) for i in range(4)]
    engine = make_engine(cached_versions=2)
    live = versions[-1]
    assert engine.serving_version == live
    for v in versions[:3]:
        prediction = asyncio.run(engine.predict([image(3)], version=v, top_k=50))
        assert prediction.model_version == v
        assert len(prediction.results[0].predictions) == 2 * (v - versions[0] + 1)
        cached = engine.stats()["versions"]["cached_versions"]
        assert len(cached) <= 2 and live in cached  # the serving version is never evicted
    assert engine.stats()["versions"]["evictions_total"] >= 2
    # A cached pinned version costs no load; the live one keeps serving unpinned requests.
    loads = engine.stats()["versions"]["loads_total"]
    assert asyncio.run(engine.predict([image(3)], version=versions[2])).model_version == versions[2]
    assert engine.stats()["versions"]["loads_total"] == loads
    assert asyncio.run(engine.predict([image(3)])).model_version == live


def test_explicit_reload_without_the_watcher(publisher, make_engine):
    engine = make_engine(watch=False)
    assert engine.serving_version is None
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    time.sleep(0.1)
    assert engine.serving_version is None  # nobody polls
    assert engine.reload() == v1 and engine.serving.labels == ("cat", "dog")
    assert asyncio.run(engine.areload()) == v1


def test_start_falls_back_when_the_live_snapshot_is_bad(publisher, make_engine):
    good = publisher.learn_and_publish("animals", ["cat", "dog"])
    publisher.learn("vehicles", ["car"])
    publisher.publish(tamper=publisher.corrupt)
    engine = make_engine()
    assert engine.ready and engine.serving_version == good
    assert engine.stats()["swaps_failed"] == 1


def test_batch_hooks_and_stats(publisher, make_engine):
    publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = make_engine()
    sizes: list[int] = []
    engine.on_batch(lambda size, seconds: sizes.append(size))
    asyncio.run(engine.predict([image(i) for i in range(5)]))
    assert sum(sizes) == 5
    stats = engine.stats()
    assert stats["items_total"] == 5 and stats["batches_total"] == len(sizes) and stats["requests_total"] == 1
    assert stats["mean_batch_size"] == pytest.approx(5 / len(sizes)) and stats["queue_depth"] == 0
    assert stats["swaps_total"] == 1 and stats["swaps_failed"] == 0 and stats["last_swap_seconds"] > 0
    assert stats["serving_version"] == 1 and stats["versions"]["cached_versions"] == [1]
    wait_for(lambda: engine.stats()["registry_polls_total"] > 0)  # the watcher polls every 20 ms
    assert engine.stats()["registry_live_version"] == 1
    info = engine.describe()
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["input_size"] == [32, 32]


def test_stop_drains_in_flight_predictions(publisher, make_engine):
    publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = make_engine(max_batch_size=2, max_wait_ms=20.0)

    async def main():
        tasks = [asyncio.ensure_future(engine.predict([image(i)])) for i in range(8)]
        await asyncio.sleep(0.005)
        drained = await asyncio.get_running_loop().run_in_executor(None, engine.stop, 10.0)
        return drained, await asyncio.gather(*tasks)

    drained, predictions = asyncio.run(main())
    assert drained and len(predictions) == 8 and all(p.model_version == 1 for p in predictions)
    assert not engine.ready


@pytest.mark.parametrize("input_norm", ["timm", "per-image"])
def test_device_side_normalisation_equals_the_preprocessor(input_norm):
    backbone = TINY_RANDOM.model_copy(update={"input_norm": input_norm})
    model = FMLoRAModel(tiny_config(backbone))
    backend = TorchBackend(model, torch.device("cpu"), torch.float32, merge=False)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(backend.normalize(x), model.preprocessor(x))


def test_merged_and_unmerged_engines_agree(publisher, make_engine):
    publisher.learn_and_publish("animals", ["cat", "dog", "cow"])
    merged = make_engine(merge_adapters=True)
    plain = make_engine(merge_adapters=False)
    imgs = [image(i) for i in range(3)]
    a = merged.predict_sync(imgs, top_k=3)
    b = plain.predict_sync(imgs, top_k=3)
    for ra, rb in zip(a.results, b.results, strict=True):
        sa = {p["label"]: p["score"] for p in ra.predictions}
        sb = {p["label"]: p["score"] for p in rb.predictions}
        assert sa.keys() == sb.keys()
        assert all(sa[k] == pytest.approx(sb[k], abs=1e-5) for k in sa)


def test_crop_follows_the_training_recipe(publisher, make_engine):
    engine = make_engine()
    model = seeded_model(publisher.config)
    # fmlora.worker.worker trains with min(1, data_config crop_pct); serving must resize the same way.
    assert engine.crop_pct == min(1.0, float(model.preprocessor.data_config.get("crop_pct", 1.0) or 1.0))


def test_a_failed_start_releases_its_threads(publisher, monkeypatch):
    other = FMLoRAModel(tiny_config(adapter=tiny_config().adapter.model_copy(update={"rank": 4})))
    with pytest.raises(ValueError, match="another ModelConfig"):
        Engine(publisher.registry, EngineConfig(device="cpu"), model=other).start()

    def broken(self, sizes):
        raise RuntimeError("warm-up exploded")

    monkeypatch.setattr(TorchBackend, "warm_bare", broken)
    engine = Engine(publisher.registry, EngineConfig(device="cpu"), model=seeded_model(publisher.config))
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="exploded"):
        engine.start()
    time.sleep(0.05)
    assert "fmlora-inference" not in {t.name for t in threading.enumerate()} - before
    assert not engine.ready
    with pytest.raises(NotReadyError):
        engine.predict_sync([image(0)])


def test_a_model_without_meta_prompts(tmp_path):
    publisher = Publisher(tmp_path / "home", tiny_config(prompts=PromptConfig(enabled=False)))
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = Engine(publisher.registry, EngineConfig(device="cpu"), model=seeded_model(publisher.config))
    engine.start()
    try:
        auto = engine.predict_sync([image(0)]).results[0]
        assert auto.prompt == {"mode": "auto", "task": None, "weights": {}}
        named = engine.predict_sync([image(0)], prompt={"task": "animals"}).results[0]
        assert named.prompt == {"mode": "task", "task": "animals", "weights": {}}
        probs, labels = reference_probs(publisher, v1, [image(0)])
        for p in auto.predictions:
            assert p["score"] == pytest.approx(float(probs[0, labels.index(p["label"])]), abs=1e-5)
    finally:
        engine.stop(5)


def test_a_swap_prepares_off_the_inference_thread_and_activation_only_rebinds(publisher, make_engine):
    """Loading, merging and the probe run in the thread that swaps; the inference thread keeps
    answering meanwhile, and switching to the new version there copies nothing."""
    publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = make_engine(watch=False)
    backend = engine._backend
    probe_threads: list[str] = []
    release = threading.Event()
    real_run = backend._run

    def slow_probe(model, images, choices):
        if model is backend._shadow:
            probe_threads.append(threading.current_thread().name)
            assert release.wait(10)
        return real_run(model, images, choices)

    backend._run = slow_probe
    v2 = publisher.learn_and_publish("vehicles", ["car", "bus"])
    swapping = threading.Thread(target=engine.reload, name="swapper")
    swapping.start()
    try:
        wait_for(lambda: probe_threads == ["swapper"])
        started = time.monotonic()
        for i in range(3):  # the probe is held: requests still get answers, from the version serving
            assert engine.predict_sync([image(i)]).model_version == 1
        assert time.monotonic() - started < 5
    finally:
        release.set()
        swapping.join(10)
    assert engine.serving_version == v2
    switches = engine.stats()["adapter_switches_total"]
    assert engine.predict_sync([image(0)]).model_version == v2
    assert engine.stats()["adapter_switches_total"] == switches + 1
    prepared = engine.serving.prepared
    for name, layer in backend.model.adapted.items():
        assert layer.merged_weight is prepared.merged[name]  # bound, not copied
    head = backend.model.head
    assert head.frozen_weight is engine.serving.tensors["head.weight"] and head.labels == ["cat", "dog", "car", "bus"]


def test_the_shadow_shares_the_resident_backbone(make_engine):
    backend = make_engine()._backend
    resident = dict(backend.model.backbone.named_parameters())
    shadow = dict(backend._shadow.backbone.named_parameters())
    frozen = [name for name in resident if ".lora_" not in name and "prompt" not in name]
    assert frozen and all(shadow[name].data_ptr() == resident[name].data_ptr() for name in frozen)
    assert backend._shadow.backbone is not backend.model.backbone


def test_an_engine_told_not_to_follow_the_registry_keeps_its_version(publisher, make_engine):
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = make_engine(follow_registry=False)
    v2 = publisher.learn_and_publish("vehicles", ["car"])
    time.sleep(0.1)  # five poll intervals
    assert engine.reload() == v1 and engine.serving_version == v1
    assert engine.predict_sync([image(0)]).model_version == v1 and publisher.registry.live_version() == v2
    assert engine.stats()["registry_polls_total"] == 0


def test_every_swap_reports_its_stages(publisher, make_engine):
    """Loading a version reports every stage from the registry read to the flip; swapping back to a
    version still in the cache reports a flip only (its row read, then the reference)."""
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = make_engine(watch=False)
    reported: list[dict[str, float]] = []
    engine.on_swap_stages(lambda stages: reported.append(dict(stages)))
    v2 = publisher.learn_and_publish("vehicles", ["car"])
    before = time.time()
    assert engine.reload() == v2
    loaded = reported[-1]
    assert set(loaded) == {"registry", "fetch", "read", "check", "stage", "prepare", "probe", "swap"}
    assert all(seconds >= 0 for seconds in loaded.values())
    assert before <= engine.stats()["serving_since"] <= time.time()
    publisher.registry.activate(v1)
    assert engine.reload() == v1
    assert set(reported[-1]) == {"registry", "swap"}


def test_a_swap_reads_the_version_row_once(publisher, make_engine, monkeypatch):
    """The source reads the live row and the swap passes it on: neither the engine, the cache nor the
    fetch reads the version again (each read is a round trip to the database)."""
    publisher.learn_and_publish("animals", ["cat", "dog"])
    registry = publisher.registry
    reads: list[str] = []
    for name in ("live", "get_version"):
        method = getattr(registry, name)
        monkeypatch.setattr(registry, name, lambda *a, _m=method, _n=name: reads.append(_n) or _m(*a))
    engine = make_engine(watch=False)
    v2 = publisher.learn_and_publish("vehicles", ["car"])
    reads.clear()
    assert engine._source.check() == v2 and engine.serving_version == v2
    assert reads == ["live"]


def test_a_version_source_of_its_own_tells_the_engine(publisher, make_engine):
    """The seam for sources other than polling (e.g. database notifications): ``_watch`` alone."""
    v1 = publisher.learn_and_publish("animals", ["cat", "dog"])
    notified = threading.Event()

    class NotifiedSource(VersionSource):
        def _watch(self, stop: threading.Event) -> None:
            while not stop.is_set():
                if notified.wait(0.05):
                    notified.clear()
                    self.check_safely()

    engine = make_engine(source=lambda read, current, apply: NotifiedSource(read, current, apply))
    assert engine.serving_version == v1
    v2 = publisher.learn_and_publish("vehicles", ["car"])
    time.sleep(0.1)
    assert engine.serving_version == v1  # nobody said anything
    notified.set()
    wait_for(lambda: engine.serving_version == v2)


def test_swaps_reuse_the_merged_weights_of_released_versions(publisher, make_engine):
    """Once the cache is full, a swap allocates no new merged weights: a version's storage comes back
    as soon as the cache drops it and no model binds it (by reference counting, not a later GC)."""
    publisher.learn_and_publish("animals", ["cat", "dog"])
    engine = make_engine(watch=False, cached_versions=2)
    gc.disable()
    try:
        for i in range(8):
            publisher.learn_and_publish(f"task{i}", [f"c{i}"])
            engine.reload()
            assert engine.predict_sync([image(i)]).model_version == engine.serving_version
        # Two cached, one more while the next loads, and the shadow's: never more alive at once.
        assert engine._backend._storage.allocated <= 4
    finally:
        gc.enable()
