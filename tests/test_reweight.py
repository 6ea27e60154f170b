"""Re-weighting and logit-adjustment tests (shared/notes/algorithms.md §1.2 (a)-(e) and §1.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ReweightConfig
from trainer.reweight import (
    DRW_BETA,
    LOGIT_ADJUST_TAU,
    RELOSS_NAMES,
    RELOSSES,
    CrossEntropy,
    DRWLoss,
    LogitAdjustedLoss,
    build_loss,
    effective_number_weights,
    log_prior,
    posthoc_adjust,
)

CIFAR100_LT = [int(500 * 0.01 ** (i / 99)) for i in range(100)]  # LDAM-DRW imbalance_cifar.py, IF 100


def _batch(c: int, b: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g)


# ------------------------------------------------------------------------------------ effective numbers
def test_weights_hand_computed() -> None:
    # counts (1, 2), beta 0.5: raw (0.5/0.5, 0.5/0.75) = (1, 2/3); sum 5/3; times C/sum = 2 * 3/5 -> (1.2, 0.8)
    torch.testing.assert_close(effective_number_weights([1, 2], 0.5), torch.tensor([1.2, 0.8]))
    # counts (1, 1, 3), beta 0.9: raw (1, 1, 0.1/0.271); normalised to sum 3
    raw = torch.tensor([1.0, 1.0, 0.1 / (1 - 0.9**3)], dtype=torch.float64)
    torch.testing.assert_close(effective_number_weights([1, 1, 3], 0.9), (3 * raw / raw.sum()).float())


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.9998, 0.9999])
def test_weights_sum_to_num_classes(beta: float) -> None:  # (a)
    w = effective_number_weights(CIFAR100_LT, beta)
    assert w.shape == (100,) and w.dtype == torch.float32
    assert float(w.double().sum()) == pytest.approx(100.0, rel=1e-6)


def test_weights_fall_with_count_and_tie_on_equal_counts() -> None:  # (b)
    counts = [50, 20, 20, 7, 3, 1, 7]
    w = effective_number_weights(counts, 0.99)
    order = sorted(range(len(counts)), key=lambda j: counts[j])
    assert all(w[order[i]] >= w[order[i + 1]] for i in range(len(order) - 1))
    assert w[0] < w[1] < w[3] < w[4] < w[5]
    assert w[1] == w[2] and w[3] == w[6]


def test_beta_zero_is_all_ones_and_beta_to_one_is_inverse_frequency() -> None:  # (d)
    assert torch.equal(effective_number_weights(CIFAR100_LT, 0.0), torch.ones(100))
    counts = [1, 2, 5, 10, 500]
    inv = torch.tensor([1 / n for n in counts], dtype=torch.float64)
    expected = (len(counts) * inv / inv.sum()).float()
    torch.testing.assert_close(effective_number_weights(counts, 1 - 1e-9), expected, rtol=1e-5, atol=0)


def test_cifar100_lt_weight_range_matches_the_notes() -> None:
    assert sum(CIFAR100_LT) == 10847 and CIFAR100_LT[0] == 500 and CIFAR100_LT[-1] == 5
    w = effective_number_weights(CIFAR100_LT, 0.9999)
    assert float(w[0]) == pytest.approx(0.045, abs=5e-4)  # head, n = 500
    assert float(w[-1]) == pytest.approx(4.38, abs=5e-3)  # tail, n = 5
    assert float(w[-1] / w[0]) == pytest.approx(97.6, abs=0.05)
    w2 = effective_number_weights(CIFAR100_LT, 0.9998)
    assert float(w2[-1] / w2[0]) == pytest.approx(95.2, abs=0.05)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_beta_out_of_range_is_refused(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights([3, 2], beta)


@pytest.mark.parametrize("counts", [[3, 0, 2], [3, -1, 2], [3, 2.5, 2]])
def test_bad_count_names_the_class_index(counts: list) -> None:
    with pytest.raises(ValueError, match=r"counts\[1\]"):
        effective_number_weights(counts, 0.9)
    with pytest.raises(ValueError, match=r"counts\[1\]"):
        log_prior(counts)


def test_log_prior_hand_computed() -> None:
    torch.testing.assert_close(log_prior([1, 3]), torch.tensor([math.log(0.25), math.log(0.75)]))


# ----------------------------------------------------------------------------------------------- DRW
def test_drw_is_plain_ce_to_the_bit_before_the_switch() -> None:  # (c)
    counts = [100, 10, 1]
    loss = DRWLoss(counts, 0.9999, start_epoch=3)
    logits, targets = _batch(3)
    for epoch in range(3):
        loss.set_epoch(epoch)
        assert not loss.active
        assert torch.equal(loss(logits, targets), F.cross_entropy(logits, targets))


def test_drw_switches_exactly_at_the_configured_epoch() -> None:  # (e)
    loss = DRWLoss([100, 10, 1], 0.9999, start_epoch=160)
    logits, targets = _batch(3)
    plain = F.cross_entropy(logits, targets)
    weighted = F.cross_entropy(logits, targets, weight=loss.weight)
    expected = {0: False, 159: False, 160: True, 161: True, 199: True}
    for epoch, on in expected.items():
        loss.set_epoch(epoch)
        assert loss.active is on
        assert torch.equal(loss(logits, targets), weighted if on else plain)
    assert not torch.equal(plain, weighted)
    first = DRWLoss([5, 1], start_epoch=0)
    assert first.active  # start_epoch 0: weights from the very first epoch


def test_drw_weighted_mean_divides_by_the_sum_of_weights() -> None:
    # counts (1, 2), beta 0.5 -> weights (1.2, 0.8); three samples with targets (0, 0, 1)
    loss = DRWLoss([1, 2], 0.5, start_epoch=0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    targets = torch.tensor([0, 0, 1])
    l0 = math.log(1 + math.exp(-2.0))  # -log softmax([2, 0])[0]
    l1 = math.log(1 + math.exp(1.0))  # -log softmax([0, 1])[0]
    l2 = math.log(2.0)  # -log softmax([0.5, 0.5])[1]
    expected = (1.2 * l0 + 1.2 * l1 + 0.8 * l2) / (1.2 + 1.2 + 0.8)  # not divided by the batch size 3
    assert float(loss(logits, targets)) == pytest.approx(expected, rel=1e-6)
    assert float(loss(logits, targets)) != pytest.approx((1.2 * l0 + 1.2 * l1 + 0.8 * l2) / 3, rel=1e-3)


def test_drw_weights_are_a_buffer_that_follows_the_module() -> None:
    loss = DRWLoss([10, 1], start_epoch=1)
    assert "weight" in dict(loss.named_buffers())
    assert "weight" in loss.state_dict()
    assert loss.to(torch.float64).weight.dtype == torch.float64


# ------------------------------------------------------------------------------------ logit adjustment
def test_logit_adjusted_loss_hand_computed() -> None:
    # counts (1, 3): log pi = (log .25, log .75); z = (0, 0), y = 0 -> -log softmax(log .25, log .75)[0] = -log .25
    loss = LogitAdjustedLoss([1, 3], tau=1.0)
    got = loss(torch.zeros(1, 2), torch.tensor([0]))
    assert float(got) == pytest.approx(-math.log(0.25), rel=1e-6)
    half = LogitAdjustedLoss([1, 3], tau=0.5)(torch.zeros(1, 2), torch.tensor([0]))
    # tau 0.5: softmax(0.5 log pi)[0] = sqrt(.25) / (sqrt(.25) + sqrt(.75))
    assert float(half) == pytest.approx(-math.log(0.5 / (0.5 + math.sqrt(0.75))), rel=1e-6)


def test_logit_adjustment_limits_are_plain_ce() -> None:
    logits, targets = _batch(4)
    plain = F.cross_entropy(logits, targets)
    assert torch.equal(LogitAdjustedLoss([100, 10, 5, 1], tau=0.0)(logits, targets), plain)  # tau = 0
    # uniform prior: a constant shift, which softmax ignores (equal up to rounding of the shift)
    torch.testing.assert_close(LogitAdjustedLoss([7, 7, 7, 7])(logits, targets), plain, rtol=1e-6, atol=1e-6)


def test_posthoc_adjustment_favours_the_tail() -> None:
    counts = [1000, 100, 10]
    tied = torch.zeros(2, 3)
    assert posthoc_adjust(tied, counts).argmax(-1).tolist() == [2, 2]
    # a head-class logit ahead by less than log(1000/10) loses to the tail
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    assert posthoc_adjust(logits, counts).argmax(-1).item() == 2
    assert posthoc_adjust(logits, counts, tau=0.0).argmax(-1).item() == 0
    torch.testing.assert_close(posthoc_adjust(logits, counts, tau=0.5), logits - 0.5 * log_prior(counts))


def test_tau_and_shapes_are_validated() -> None:
    with pytest.raises(ValueError, match="tau"):
        LogitAdjustedLoss([3, 1], tau=-1.0)
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        LogitAdjustedLoss([3, 1])(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        DRWLoss([3, 1], start_epoch=0)(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="start_epoch"):
        DRWLoss([3, 1], start_epoch=-1)
    with pytest.raises(ValueError, match="epoch"):
        DRWLoss([3, 1], start_epoch=0).set_epoch(-2)


# ---------------------------------------------------------------------------------------------- factory
def test_build_loss() -> None:
    assert RELOSS_NAMES == ("none", "drw", "logit_adjust")
    counts = [50, 5]
    ce = build_loss(ReweightConfig(), counts, start_epoch=3)
    assert isinstance(ce, CrossEntropy)
    ce.set_epoch(7)  # no-op, same interface
    logits, targets = _batch(2)
    assert torch.equal(ce(logits, targets), F.cross_entropy(logits, targets))
    drw = build_loss(ReweightConfig(name="drw", beta=0.99), counts, start_epoch=3)
    assert isinstance(drw, DRWLoss) and drw.start_epoch == 3
    torch.testing.assert_close(drw.weight, effective_number_weights(counts, 0.99))
    la = build_loss(ReweightConfig(name="logit_adjust", tau=0.5), counts, start_epoch=3)
    assert isinstance(la, LogitAdjustedLoss) and la.tau == 0.5
    with pytest.raises(ValueError, match=r"'focal'.*none.*drw.*logit_adjust"):
        build_loss(ReweightConfig.model_construct(name="focal"), counts, start_epoch=3)
    with pytest.raises(ValueError, match=r"unknown re-weighting 'focal'.*none.*drw.*logit_adjust"):
        ReweightConfig(name="focal")


def test_reloss_registry_is_the_config_source() -> None:
    assert tuple(RELOSSES) == RELOSS_NAMES
    assert ReweightConfig.model_json_schema()["properties"]["name"]["enum"] == list(RELOSSES)
    assert {n: s.cls for n, s in RELOSSES.items()} == {
        "none": CrossEntropy,
        "drw": DRWLoss,
        "logit_adjust": LogitAdjustedLoss,
    }
    # one default per hyperparameter: the config's field defaults are the classes' constructor defaults
    r = ReweightConfig()
    assert r.beta == DRW_BETA == DRWLoss([3, 1], start_epoch=0).beta
    assert r.tau == LOGIT_ADJUST_TAU == LogitAdjustedLoss([3, 1]).tau
    for name, spec in RELOSSES.items():
        assert type(build_loss(ReweightConfig(name=name), [3, 1], start_epoch=2)) is spec.cls
        assert set(spec.hyperparameters) <= set(ReweightConfig.model_fields)
