import pytest
import torch

from fmlora.errors import TaskError
from fmlora.model import IncrementalHead


def test_class_incremental_tasks_append_rows_and_keep_old_rows_frozen():
    head = IncrementalHead(8)
    head.begin_task("a", ["x", "y"], "class", train_old_rows=False)
    head.consolidate()
    old = head.weight.clone()
    new = head.begin_task("b", ["z"], "class", train_old_rows=False)
    assert new == ["z"] and head.labels == ["x", "y", "z"] and head.label_tasks == ["a", "a", "b"]
    assert head.trainable_weight.shape == (1, 8)
    optimizer = torch.optim.AdamW([head.trainable_weight, head.trainable_bias], lr=1.0, weight_decay=1.0)
    head(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    assert torch.equal(head.weight[:2], old)


def test_class_incremental_task_cannot_repeat_known_classes():
    head = IncrementalHead(4)
    head.begin_task("a", ["x"], "class", train_old_rows=False)
    with pytest.raises(TaskError, match="repeats known classes"):
        head.begin_task("b", ["x", "y"], "class", train_old_rows=False)


def test_domain_task_reuses_rows_and_adds_only_new_classes():
    head = IncrementalHead(4)
    head.begin_task("a", ["x", "y"], "class", train_old_rows=False)
    new = head.begin_task("b", ["y", "x", "w"], "domain", train_old_rows=True)
    assert new == ["w"] and head.labels == ["x", "y", "w"]
    assert head.trainable_weight.shape == (3, 4)  # shared rows train in a domain task
    head.consolidate()
    assert head.frozen_weight.shape == (3, 4) and head.trainable_weight.shape == (0, 4)


def test_empty_head_refuses_to_predict():
    with pytest.raises(TaskError):
        IncrementalHead(4)(torch.randn(1, 4))


def test_random_features_are_regenerated_from_the_seed_and_never_saved():
    from fmlora.model import RandomFeatures

    a, b, c = RandomFeatures(6, 20, seed=4), RandomFeatures(6, 20, seed=4), RandomFeatures(6, 20, seed=5)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    assert "projection" not in a.state_dict()
    x = torch.randn(3, 6)
    assert torch.equal(a(x), torch.relu(x @ a.projection.T)) and bool((a(x) >= 0).all())


def test_a_solved_head_replaces_every_row_over_the_random_features():
    from fmlora.model import RandomFeatures

    head = IncrementalHead(6, feature_map=RandomFeatures(6, 10, seed=0))
    head.begin_task("a", ["x", "y"], "class", train_old_rows=False)
    assert head.trainable_weight.shape == (2, 10)
    with pytest.raises(TaskError, match="while a task trains"):
        head.set_rows(torch.zeros(2, 10))
    head.consolidate()
    weight = torch.randn(2, 10)
    head.set_rows(weight)
    x = torch.randn(4, 6)
    assert torch.allclose(head(x), head.feature_map(x) @ weight.T)
    with pytest.raises(TaskError, match="solved rows must be"):
        head.set_rows(torch.zeros(3, 10))


def test_solved_rows_are_rounded_once_to_float16_and_published_in_it():
    from fmlora.model import RandomFeatures

    head = IncrementalHead(6, feature_map=RandomFeatures(6, 10, seed=0), solved_row_dtype="float16")
    head.begin_task("a", ["x", "y"], "class", train_old_rows=False)
    head.consolidate()
    weight = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    head.set_rows(weight)
    # Kept in the model's dtype, with values float16 can hold: what is evaluated is what is served.
    assert head.weight.dtype == torch.float32 and not torch.equal(head.weight, weight)
    assert torch.equal(head.weight, weight.half().float())
    published = head.publishable_weight()
    assert published.dtype == torch.float16 and torch.equal(published.float(), head.weight)
    # Rows float16 cannot hold stay as solved.
    huge = torch.full((2, 10), 1e6)
    head.set_rows(huge)
    assert torch.equal(head.weight, huge) and head.publishable_weight().dtype == torch.float32


def test_float32_rows_and_trained_rows_are_published_as_kept():
    exact = IncrementalHead(4, solved_row_dtype="float32")
    exact.begin_task("a", ["x"], "class", train_old_rows=False)
    exact.consolidate()
    weight = torch.randn(1, 4, generator=torch.Generator().manual_seed(1))
    exact.set_rows(weight)
    assert torch.equal(exact.weight, weight) and exact.publishable_weight().dtype == torch.float32
    # Trained rows of a float16 head were never rounded: publishing them in float16 would lose bits.
    trained = IncrementalHead(4, solved_row_dtype="float16")
    trained.begin_task("a", ["x"], "class", train_old_rows=False, generator=torch.Generator().manual_seed(2))
    trained.consolidate()
    assert trained.publishable_weight().dtype == torch.float32
    with pytest.raises(TaskError, match="float32 or float16"):
        IncrementalHead(4, solved_row_dtype="bfloat16")
