"""The outlier rule on hand-made norm vectors whose thresholds are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from sinkless.scan.norms import OutlierRule, Rule, robust_median, thresholds

MAD_SCALE = 1.4826  # MAD of a normal distribution -> its sigma


def test_mad_term_uses_the_normal_consistency_constant():
    # median 3, |x - 3| = [1, 1, 0, 0, 0, 1, 1, 1, 8.5] -> MAD 1: tau = max(3 x 3, 3 + 6 x 1.4826 x 1) = 11.8956
    norms = torch.tensor([2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0, 11.5])
    tau = float(thresholds(norms, OutlierRule()))
    assert tau == pytest.approx(3 + 6 * MAD_SCALE, abs=1e-5)
    # the verdict turns on the constant: 11.5 stands below 3 + 6 x 1.4826 but above 3 + 6 x 1 = 9
    assert not 11.5 > tau


def test_k_scales_the_mad_term():
    norms = torch.tensor([2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0, 11.5])
    assert float(thresholds(norms, OutlierRule(k=2.0))) == pytest.approx(max(9.0, 3 + 2 * MAD_SCALE), abs=1e-5)
    assert float(thresholds(norms, OutlierRule(k=5.0, floor=1.0))) == pytest.approx(3 + 5 * MAD_SCALE, abs=1e-5)


def test_floor_term_when_the_spread_is_small():
    # median 1, MAD 0: the floor decides, tau = 3 x median (not median + anything)
    norms = torch.tensor([1.0] * 8 + [9.0])
    assert float(thresholds(norms, OutlierRule())) == pytest.approx(3.0)
    assert float(thresholds(norms, OutlierRule(floor=2.5))) == pytest.approx(2.5)


def test_masked_entries_do_not_count():
    # the masked 1000 (e.g. a CLS token or padding) would move neither median nor MAD if ignored
    norms = torch.tensor([[1.0, 1.0, 1.0, 2.0, 1000.0], [1.0, 2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, True, True, False], [True] * 5])
    tau = thresholds(norms, OutlierRule(), mask)  # (2,)
    assert tau.shape == (2,)
    assert tau.tolist() == pytest.approx([3.0, 6.0])
    assert float(thresholds(norms[:1], OutlierRule())[0]) == pytest.approx(3.0)  # unmasked: median 1, MAD 0


def test_robust_median_is_the_lower_middle_and_ignores_the_mask():
    values = torch.tensor([[4.0, 1.0, 3.0, 2.0], [5.0, 100.0, 7.0, 8.0]])
    assert robust_median(values).tolist() == [2.0, 7.0]  # lower median of an even count
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert robust_median(values, mask).tolist() == [3.0, 8.0]


def test_meanstd_rule_is_mean_plus_three_sample_sigmas():
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = 3.0 + 3 * math.sqrt(2.5)  # sample variance (n - 1)
    assert float(thresholds(norms, OutlierRule(rule=Rule.MEANSTD))) == pytest.approx(expected, rel=1e-6)
    # masked entries leave mean and variance alone
    padded = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 50.0])
    mask = torch.tensor([True] * 5 + [False])
    assert float(thresholds(padded, OutlierRule(rule=Rule.MEANSTD), mask)) == pytest.approx(expected, rel=1e-6)
    # one token: no spread, the threshold is the value itself
    assert float(thresholds(torch.tensor([2.0]), OutlierRule(rule=Rule.MEANSTD))) == pytest.approx(2.0)


def test_absolute_threshold_replaces_both_rules():
    norms = torch.tensor([[1.0, 2.0, 50.0], [3.0, 3.0, 3.0]])
    for rule in (Rule.ROBUST, Rule.MEANSTD):
        tau = thresholds(norms, OutlierRule(rule=rule, absolute=7.5))
        assert tau.tolist() == [7.5, 7.5] and tau.dtype == norms.dtype


def test_rule_description_and_dict():
    robust = OutlierRule(floor=2.0, k=4.0)
    assert robust.describe() == "norm > max(2 x median, median + 4 x 1.4826 x MAD) of the input's body-token norms at the layer"
    assert OutlierRule(absolute=12.5).describe() == "norm > 12.5 (absolute)"
    assert OutlierRule(rule=Rule.MEANSTD).describe().startswith("norm > mean + 3 sigma")
    assert robust.to_dict() == {"rule": "robust", "floor": 2.0, "k": 4.0, "absolute": None, "text": robust.describe()}
    assert OutlierRule(rule=Rule.MEANSTD).to_dict()["rule"] == "meanstd"


def test_masked_median_and_mad_come_from_the_unmasked_entries_only():
    norms = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    mask = torch.tensor([True, True, True, True, False, False, False])
    # kept: 1, 1, 1, 5 -> median 1 (lower middle), MAD 0 -> 3 x 1; all seven: median 5 -> 15
    assert float(thresholds(norms, OutlierRule(), mask)) == pytest.approx(3.0)
    assert float(thresholds(norms, OutlierRule())) == pytest.approx(15.0)


def test_thresholds_keep_every_leading_dimension():
    # (layers, inputs, tokens) -> (layers, inputs), for every rule
    norms = torch.tensor([[[1.0, 1.0, 1.0, 9.0], [2.0, 2.0, 2.0, 2.0]], [[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])
    robust = thresholds(norms, OutlierRule())
    torch.testing.assert_close(robust, torch.tensor([[3.0, 6.0], [max(6.0, 2 + 6 * MAD_SCALE), 15.0]]))
    assert robust_median(norms).tolist() == [[1.0, 2.0], [2.0, 5.0]]
    meanstd = thresholds(norms[0], OutlierRule(rule=Rule.MEANSTD))  # (2,): each row its own mean and spread
    assert meanstd.tolist() == pytest.approx([3.0 + 3 * 4.0, 2.0])
    assert thresholds(norms, OutlierRule(absolute=2.0)).shape == (2, 2)
    assert thresholds(torch.tensor([1.0, 2.0]), OutlierRule(absolute=2.0)).shape == ()
    double = thresholds(norms.double(), OutlierRule(absolute=2.0))
    assert double.dtype == torch.float64


def test_meanstd_of_two_tokens_uses_n_minus_one():
    # [1, 3]: mean 2, sample variance (1 + 1) / 1 = 2
    assert float(thresholds(torch.tensor([1.0, 3.0]), OutlierRule(rule=Rule.MEANSTD))) == pytest.approx(2 + 3 * math.sqrt(2))


def test_the_mad_ignores_masked_entries_too():
    # kept 1, 2, 3: median 2, MAD 1; the masked 2s would leave the median at 2 but make the MAD 0
    norms = torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0])
    mask = torch.tensor([True, True, True, False, False])
    assert float(thresholds(norms, OutlierRule(), mask)) == pytest.approx(2 + 6 * MAD_SCALE, abs=1e-5)
    assert float(thresholds(norms, OutlierRule())) == pytest.approx(6.0)
