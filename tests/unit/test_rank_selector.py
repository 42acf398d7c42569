import torch

from fmlora.model import RankSelector, RankSelectorConfig, task_complexity, task_novelty
from tests.helpers import learn_quickly


def test_complexity_grows_with_feature_spread():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(200, 2, generator=g) @ torch.randn(2, 32, generator=g)
    spread = torch.randn(200, 32, generator=g)
    easy, hard = task_complexity(low_rank), task_complexity(spread)
    assert 0 <= easy < 0.3 < 0.8 < hard <= 1


def test_novelty_is_zero_for_a_repeated_mean_and_one_for_the_first_task():
    mean = torch.randn(16)
    assert task_novelty(mean, None) == 1.0
    assert task_novelty(mean, mean.unsqueeze(0)) < 1e-6
    assert task_novelty(mean, (-mean).unsqueeze(0)) == 1.0


def test_more_complex_task_gets_larger_expected_rank_under_the_prior():
    selector = RankSelector(16, RankSelectorConfig())
    expected = []
    for complexity in (0.1, 0.4, 0.7, 1.0):
        selector.begin_task(complexity, novelty=0.5)
        expected.append(selector.expected_rank())
    print("expected rank by complexity 0.1/0.4/0.7/1.0:", [round(e, 2) for e in expected])
    assert expected == sorted(expected) and expected[-1] - expected[0] > 4


def test_soft_gate_is_monotone_and_hard_gate_is_a_prefix():
    selector = RankSelector(8, RankSelectorConfig())
    selector.begin_task(0.5, 0.5)
    torch.manual_seed(0)
    gate = selector.sample_gate()
    assert gate.shape == (8,) and torch.all(gate[:-1] >= gate[1:] - 1e-6) and abs(float(gate[0].detach()) - 1) < 1e-5
    selector.anneal(1.0)
    assert abs(selector.temperature - selector.config.tau_end) < 1e-9
    rank = selector.end_task()
    hard = selector.hard_gate(rank)
    assert hard.sum() == rank and torch.equal(hard[:rank], torch.ones(rank))


def test_gate_receives_gradient_through_the_loss():
    selector = RankSelector(8, RankSelectorConfig())
    selector.begin_task(0.5, 0.5)
    (selector.sample_gate() * torch.arange(8.0)).sum().backward()
    assert selector.logits.grad is not None and selector.logits.grad.abs().sum() > 0


def test_chosen_rank_is_recorded_in_the_task_record(tiny_model):
    learn_quickly(tiny_model, "a", ["x", "y"])
    record = tiny_model.tasks[0]
    assert record.rank in tiny_model.rank_selector.candidate_ranks.tolist()
    assert 0 <= record.complexity <= 1 and 0 <= record.novelty <= 1
