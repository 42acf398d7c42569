"""The promotion gate (fmlora.worker.gate) and the worker state it reads (fmlora.worker.state)."""

import pytest
import torch

from fmlora.data import make_synthetic_stream
from fmlora.data.images import TaskData
from fmlora.errors import WorkerStateError
from fmlora.model import FMLoRAModel
from fmlora.registry.worker_state import WorkerState
from fmlora.training import Learner, TrainConfig
from fmlora.worker import GateConfig
from fmlora.worker.state import ClassState, pack_state, unpack_state
from tests.conftest import tiny_config


def test_a_candidate_below_the_training_free_baseline_is_rejected_with_the_reason():
    gate = GateConfig(baseline_tolerance=0.02)
    baseline = {"new_task": 0.60, "overall": 0.55}
    assert gate.check(0.59, {}, 0.54, baseline) == []  # within the tolerance
    reasons = gate.check(0.40, {}, 0.56, baseline)
    assert len(reasons) == 1 and "new-task accuracy 0.4000 is below the training-free baseline's 0.6000" in reasons[0]
    reasons = gate.check(0.70, {}, 0.50, baseline)
    assert len(reasons) == 1 and reasons[0].startswith("all-class accuracy 0.5000")
    assert GateConfig(baseline_tolerance=None).check(0.0, {}, 0.0, baseline) == []
    assert gate.check(0.0, {}, 0.0, None) == []  # no baseline yet: nothing to compare


def test_worker_state_carries_both_statistics_and_refuses_another_head():
    torch.manual_seed(0)
    model = FMLoRAModel(tiny_config())
    task = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=5, test_per_class=2)[0]
    classes = unpack_state(None, model)
    assert classes.ridge is not None and classes.ridge.labels == [] and classes.baseline.dim == 0
    Learner(TrainConfig(epochs=1, progress_bar=False)).learn_task(model, task, statistics=classes.ridge)
    classes.baseline.add(torch.randn(len(task.train), model.embed_dim), task.train.labels, task.train.classes)
    state = pack_state(classes)
    back = unpack_state(state, model)
    assert back.ridge is not None and back.ridge.labels == list(task.classes)
    assert torch.equal(back.ridge.gram, classes.ridge.gram) and torch.equal(back.baseline.sums, classes.baseline.sums)
    # Statistics of another head (another projection seed) are refused, not silently reused.
    other = WorkerState(
        state.tensors, {**state.meta, "ridge": {**state.meta["ridge"], "random_features": {"dim": 2000, "seed": 9}}}
    )
    with pytest.raises(WorkerStateError, match="ridge statistics cannot be used"):
        unpack_state(other, model)


def _one_task_learned() -> tuple[FMLoRAModel, TaskData, ClassState]:
    """A tiny model that has learned one two-class task, with its fresh worker state."""
    torch.manual_seed(0)
    model = FMLoRAModel(tiny_config())
    task = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=5, test_per_class=2)[0]
    classes = unpack_state(None, model)
    Learner(TrainConfig(epochs=1, progress_bar=False)).learn_task(model, task, statistics=classes.ridge)
    return model, task, classes


def test_worker_state_keeps_the_second_moment_and_accepts_state_published_before_it():
    model, _, classes = _one_task_learned()
    state = pack_state(classes)
    back = unpack_state(state, model)
    assert back.ridge is not None and classes.ridge is not None
    assert torch.equal(back.ridge.moment, classes.ridge.moment) and back.ridge.moment.abs().sum() > 0
    # Older state has no second moment: the class means' own moment stands in (no spread known).
    older = WorkerState({k: v for k, v in state.tensors.items() if not k.endswith("moment")}, state.meta)
    legacy = unpack_state(older, model).ridge
    assert legacy is not None and float(legacy.within_class_covariance(shrinkage=0.0).abs().max()) < 1e-6
    assert torch.equal(legacy.gram, classes.ridge.gram)


def test_held_out_statistics_travel_in_the_state_only_when_there_are_some():
    model, task, classes = _one_task_learned()
    assert classes.held_out is not None and not any(k.startswith("held_out.") for k in pack_state(classes).tensors)
    classes.held_out.add(torch.randn(len(task.test), model.embed_dim), task.test.labels, task.test.classes)
    state = pack_state(classes)
    # Their G is kept in float32 (only ever solved at a chosen λ); the training statistics' in float64.
    assert state.tensors["held_out.gram_upper"].dtype == torch.float32
    assert state.tensors["ridge.gram_upper"].dtype == torch.float64
    back = unpack_state(state, model)
    assert back.held_out is not None and back.held_out.labels == list(task.classes)
    assert back.held_out.gram.dtype == torch.float64 and back.held_out.counts.sum() == len(task.test)
    assert torch.allclose(back.held_out.gram, classes.held_out.gram, rtol=1e-6, atol=0)
    assert torch.equal(back.held_out.cross, classes.held_out.cross)
