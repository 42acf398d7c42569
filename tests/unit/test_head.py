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
