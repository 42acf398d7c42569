"""The ridge head solved from class statistics after every task (fmlora.training.learner)."""

import pytest
import torch

from fmlora.data import make_synthetic_stream
from fmlora.errors import DataError
from fmlora.model import FMLoRAModel, HeadConfig
from fmlora.training import Learner, TrainConfig, new_statistics
from tests.conftest import tiny_config


def _ridge_model(**head: object) -> FMLoRAModel:
    torch.manual_seed(0)
    return FMLoRAModel(tiny_config(head=HeadConfig(kind="ridge", random_features=64, **head)))


def _cfg(**kw) -> TrainConfig:
    # These tests exercise later tasks that train (drift, plasticity, rollback mid-training); the
    # default adapts a later task only when it is novel, which the on-demand test covers.
    kw.setdefault("adaptation", "continual")
    return TrainConfig(epochs=1, batch_size=8, lr=5e-3, progress_bar=False, **kw)


def test_the_head_is_solved_over_every_class_from_the_statistics():
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    model = _ridge_model()
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=3, train_per_class=6, test_per_class=3)
    stats = new_statistics(model)
    learner = Learner(_cfg())
    for task in stream:
        learner.learn_task(model, task, statistics=stats)
    assert model.head.labels == stats.labels == [*stream[0].classes, *stream[1].classes]
    assert model.head.weight.shape == (6, 64) and model.head.trainable_weight.numel() == 0
    # The rows are exactly a ridge solution of the statistics for one of the candidate lambdas,
    # rounded once to float16 (HeadConfig.solved_row_dtype's default).
    solutions = [stats.solve(lam).T for lam in CUMULATIVE_LAMBDAS]
    assert any(torch.allclose(model.head.weight, w.half().float(), atol=1e-6) for w in solutions)
    assert not any(torch.equal(model.head.weight, w) for w in solutions)
    assert stats.counts.tolist() == [6.0] * 6 and stats.cross.shape == (64, 6)
    # By default λ comes from hits tallied over the stream's tasks, kept with the statistics.
    assert len(stats.lambda_evidence) == len(CUMULATIVE_LAMBDAS) and float(stats.lambda_evidence.sum()) > 0


def test_a_failed_task_leaves_model_and_statistics_untouched():
    model = _ridge_model()
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=6, test_per_class=2)
    stats = new_statistics(model)
    learner = Learner(_cfg())
    learner.learn_task(model, stream[0], statistics=stats)
    before = (list(stats.labels), stats.gram.clone(), model.head.weight.clone())

    def boom(progress):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        learner.learn_task(model, stream[1], progress=boom, statistics=stats)
    assert stats.labels == before[0] and torch.equal(stats.gram, before[1])
    assert torch.equal(model.head.weight, before[2]) and len(model.tasks) == 1


def test_without_adaptation_nothing_trains_and_first_task_adaptation_freezes_later():
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=6, test_per_class=2)
    for adaptation, trained in (("none", [0, 0]), ("first_task", [True, 0])):
        model = _ridge_model()
        _, reports = Learner(_cfg(adaptation=adaptation)).learn_stream(model, stream)
        counts = [r.trainable_parameters for r in reports]
        assert counts[1] == 0 and (counts[0] > 0) == bool(trained[0])


def test_a_ridge_head_needs_statistics():
    model = _ridge_model()
    task = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=4, test_per_class=2)[0]
    with pytest.raises(DataError, match="class statistics"):
        Learner(_cfg()).learn_task(model, task)


def test_adapted_tasks_report_their_drift_and_move_earlier_classes_statistics():
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=6, test_per_class=2)
    runs = {}
    for compensation in ("affine", "none"):
        model = _ridge_model()
        stats = new_statistics(model)
        learner = Learner(_cfg(drift_compensation=compensation, later_lr_scale=1.0))
        first = learner.learn_task(model, stream[0], statistics=stats)
        kept = stats.means[:2].clone()
        second = learner.learn_task(model, stream[1], statistics=stats)
        runs[compensation] = (first, second, kept, stats.means[:2].clone())
    first, second, kept, moved = runs["affine"]
    assert not first.drift_compensated  # nothing stored yet on the first task
    assert second.drift_compensated and second.feature_drift is not None and second.feature_drift > 0
    assert not torch.allclose(kept, moved)  # the first task's class means followed the drift
    _, plain, kept, unmoved = runs["none"]
    assert not plain.drift_compensated and torch.equal(kept, unmoved)


def test_held_out_statistics_move_with_the_training_statistics_and_are_never_solved_from():
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=6, test_per_class=3)
    model = _ridge_model()
    stats, held_out = new_statistics(model), new_statistics(model)
    learner = Learner(_cfg(later_lr_scale=1.0))
    learner.learn_task(model, stream[0], statistics=stats, held_out=held_out)
    assert held_out.labels == []  # the learner never adds to them: the worker does, after its gate
    held_out.add(torch.randn(len(stream[0].test), model.embed_dim), stream[0].test.labels, stream[0].test.classes)
    kept = held_out.means.clone()
    untouched = held_out.copy()

    def boom(progress):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        learner.learn_task(model, stream[1], progress=boom, statistics=stats, held_out=held_out)
    assert torch.equal(held_out.means, kept) and torch.equal(held_out.gram, untouched.gram)
    second = learner.learn_task(model, stream[1], statistics=stats, held_out=held_out)
    assert second.drift_compensated and held_out.labels == list(stream[0].classes)
    assert not torch.allclose(held_out.means, kept)  # moved through the same drift map
    assert held_out.counts.tolist() == untouched.counts.tolist()


def test_a_stream_with_held_out_images_serves_the_head_of_every_image():
    from dataclasses import replace

    from fmlora.data import after_first_per_class, first_per_class
    from fmlora.training import collect_features

    stream = make_synthetic_stream(num_tasks=2, classes_per_task=3, train_per_class=6, test_per_class=2)
    trained = [replace(t, train=first_per_class(t.train, 4)) for t in stream]
    held = [after_first_per_class(t.train, 4) for t in stream]
    model = _ridge_model()
    # No adaptation: features never move, so folding in task by task must give exactly the head of
    # all twelve images per class at the last task's λ.
    _, reports = Learner(_cfg(adaptation="none")).learn_stream(model, trained, held_out=held)
    everything = new_statistics(model)
    for task in stream:
        features = collect_features(model, task.train, 64, lambda x: model.forward_detailed(x).features)
        everything.add(features, task.train.labels, task.classes)
    expected = everything.solve(reports[-1].relative_lambda).T.half().float()
    assert torch.allclose(model.head.weight, expected, atol=1e-6)
    plain = _ridge_model()
    Learner(_cfg(adaptation="none")).learn_stream(plain, trained)
    difference = (plain.head.weight - model.head.weight).detach().abs().max()
    assert float(difference) > 0.01 * float(model.head.weight.detach().abs().max())
    with pytest.raises(DataError, match="one set per task"):
        Learner(_cfg(adaptation="none")).learn_stream(_ridge_model(), trained, held_out=held[:1])


def test_without_training_there_is_no_drift_to_compensate():
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=6, test_per_class=2)
    model = _ridge_model()
    _, reports = Learner(_cfg(adaptation="none")).learn_stream(model, stream)
    assert [r.drift_compensated for r in reports] == [False, False]
    assert all(r.feature_drift is not None and r.feature_drift < 1e-9 for r in reports)


def test_within_task_error_measures_how_badly_features_separate_a_task():
    from fmlora.training import within_task_error

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(10)
    separated = centres[labels] + 0.1 * torch.randn(30, 16, generator=g)
    assert within_task_error(separated, labels, 3) == 0.0
    noise = torch.randn(30, 16, generator=g)
    shuffled = labels[torch.randperm(30, generator=g)]
    assert within_task_error(torch.ones(30, 16), labels, 3) >= 0.6  # identical features: no separation
    assert within_task_error(noise, shuffled, 3) > within_task_error(separated, labels, 3)


def _first_familiar_and_novel():
    """A two-task stream, and its second task again with labels drawn at random: the current
    features cannot separate those, so that task is novel."""
    from fmlora.data import ImageSet, TaskData

    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=8, test_per_class=2)
    second = stream[1]
    g = torch.Generator().manual_seed(1)
    scrambled = ImageSet(second.train.images, torch.randint(0, 2, (16,), generator=g), second.train.classes)
    return stream, second, TaskData(second.name, second.kind, scrambled, second.test)


def test_a_novel_later_task_opens_the_bases_and_a_familiar_one_does_not():
    stream, second, hard = _first_familiar_and_novel()
    counts = {}
    for name, task, threshold in (("familiar", second, 1.0), ("novel", hard, 0.05)):
        model = _ridge_model()
        stats = new_statistics(model)
        learner = Learner(_cfg(novel_task_error=threshold))
        learner.learn_task(model, stream[0], statistics=stats)
        bases = [a.lora_A.detach().clone() for a in model._adapters()]
        report = learner.learn_task(model, task, statistics=stats)
        moved = any(not torch.equal(b, a.lora_A) for b, a in zip(bases, model._adapters(), strict=True))
        counts[name] = (report, moved)
    familiar, familiar_moved = counts["familiar"]
    novel, novel_moved = counts["novel"]
    assert familiar.novel is False and not familiar_moved and familiar.pre_task_error is not None
    assert novel.novel is True and novel_moved and novel.pre_task_error >= 0.05
    assert novel.trainable_parameters > familiar.trainable_parameters  # the bases trained too
    fixed = Learner(_cfg(plasticity="fixed")).learn_stream(_ridge_model(), stream)[1]
    assert [r.novel for r in fixed] == [None, None]


def test_on_demand_adaptation_trains_a_later_task_only_when_it_is_novel():
    stream, second, hard = _first_familiar_and_novel()
    reports = {}
    for name, task, threshold in (("familiar", second, 1.0), ("novel", hard, 0.05)):
        model = _ridge_model()
        stats = new_statistics(model)
        learner = Learner(_cfg(adaptation="on_demand", novel_task_error=threshold))
        first = learner.learn_task(model, stream[0], statistics=stats)
        adapter = [t.detach().clone() for t in model.adapter_tensors().values()]
        report = learner.learn_task(model, task, statistics=stats)
        after = list(model.adapter_tensors().values())
        moved = any(b.shape == a.shape and not torch.equal(b, a) for b, a in zip(adapter, after, strict=False))
        reports[name] = (first, report, moved)
    first, familiar, familiar_moved = reports["familiar"]
    assert first.epochs == 1 and first.trainable_parameters > 0  # the first task always adapts
    # A task the features already separate only adds statistics: nothing trains, nothing drifts.
    assert familiar.novel is False and familiar.epochs == 0 and familiar.trainable_parameters == 0
    assert not familiar.drift_compensated and familiar.relative_lambda is not None and not familiar_moved
    _, novel, novel_moved = reports["novel"]
    assert novel.novel is True and novel.epochs == 1 and novel.trainable_parameters > 0 and novel_moved


def test_on_demand_adaptation_always_adapts_a_domain_task():
    from fmlora.data import ImageSet, TaskData

    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=8, test_per_class=2)
    first, second = stream
    # The second task's images as a new domain of the first task's classes.
    domain = TaskData(
        "domain1",
        "domain",
        ImageSet(second.train.images, second.train.labels, first.train.classes),
        ImageSet(second.test.images, second.test.labels, first.test.classes),
    )
    model = _ridge_model()
    stats = new_statistics(model)
    learner = Learner(_cfg(adaptation="on_demand", novel_task_error=1.0))  # no task counts as novel
    learner.learn_task(model, first, statistics=stats)
    report = learner.learn_task(model, domain, statistics=stats)
    assert report.novel is False and report.epochs == 1 and report.trainable_parameters > 0
    assert stats.labels == list(first.classes) and stats.counts.tolist() == [16.0, 16.0]


def test_extra_views_join_the_statistics_and_the_head_is_solved_with_them():
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=6, test_per_class=2)
    model = _ridge_model()
    stats = new_statistics(model)
    learner = Learner(_cfg(statistics_views=2, views_max_task_error=None))
    reports = [learner.learn_task(model, task, statistics=stats) for task in stream]
    # Each training image counts once as itself and once per view.
    assert stats.counts.tolist() == [18.0] * 4 and [r.views for r in reports] == [2, 2]
    lam = reports[-1].relative_lambda
    assert lam in CUMULATIVE_LAMBDAS
    assert torch.allclose(model.head.weight, stats.solve(lam).T.half().float(), atol=1e-6)


@pytest.mark.parametrize(("threshold", "views"), [(0.6, 2), (0.4, 0), (None, 2)])
def test_views_only_for_a_task_whose_classes_the_features_already_separate(monkeypatch, threshold, views):
    import fmlora.training.learner as learner_module

    measured = []

    def error(features, labels, classes):
        measured.append(len(features))
        return 0.5

    monkeypatch.setattr(learner_module, "within_task_error", error)
    (task,) = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=6, test_per_class=2)
    stats = new_statistics(model := _ridge_model())
    report = Learner(_cfg(statistics_views=2, views_max_task_error=threshold)).learn_task(model, task, statistics=stats)
    assert report.views == views and stats.counts.tolist() == [6.0 * (1 + views)] * 2
    # The error is measured on the task's own training images (none needed without a threshold).
    assert measured == ([] if threshold is None else [len(task.train)])


def test_a_view_scale_outside_the_image_is_refused():
    with pytest.raises(ValueError, match="view_scale"):
        TrainConfig(view_scale=(0.5, 1.5))


def test_a_novel_task_can_train_with_the_bases_closed():
    stream, _, hard = _first_familiar_and_novel()
    model = _ridge_model()
    stats = new_statistics(model)
    learner = Learner(_cfg(novel_task_error=0.05, novel_open_bases=False, novel_lr_scale=0.5))
    learner.learn_task(model, stream[0], statistics=stats)
    bases = [a.lora_A.detach().clone() for a in model._adapters()]
    report = learner.learn_task(model, hard, statistics=stats)
    assert report.novel is True and report.epochs == 1 and report.trainable_parameters > 0
    assert all(torch.equal(b, a.lora_A) for b, a in zip(bases, model._adapters(), strict=True))
