"""Zero-shot segmentation: mass threshold, scores by hand, and the task on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkless.tasks.data import IGNORE
from sinkless.tasks.zeroseg import confusion, mass_mask, scores_from_confusion


def test_mass_threshold_keeps_the_fewest_patches_holding_the_mass():
    attention = torch.tensor([0.05, 0.5, 0.15, 0.3])
    # ranked 0.5, 0.3, 0.15, 0.05: mass before each 0, .5, .8, .95 -> keep the first two for 0.6
    assert mass_mask(attention, (2, 2), 0.6).tolist() == [[False, True], [False, True]]
    assert mass_mask(attention, (2, 2), 0.45).tolist() == [[False, True], [False, False]]
    assert mass_mask(attention, (2, 2), 1.0).all()
    # unnormalised rows give the same mask; heads are averaged first
    heads = torch.stack([attention * 3, attention.flip(0) * 0 + attention * 3])
    assert torch.equal(mass_mask(heads, (2, 2), 0.6), mass_mask(attention, (2, 2), 0.6))


def test_mass_ties_are_broken_by_patch_index():
    assert mass_mask(torch.ones(4), (1, 4), 0.5).tolist() == [[True, True, False, False]]


def test_scores_by_hand():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 0]], dtype=np.uint8)
    matrix = confusion(pred, truth, 2)
    assert matrix.tolist() == [[3, 1], [1, 2]]  # the ignored pixel counts nowhere
    scores = scores_from_confusion(matrix)
    # background IoU 3 / 5, foreground IoU 2 / 4, pixel accuracy 5 / 7
    assert scores["miou"] == pytest.approx(100 * (3 / 5 + 2 / 4) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 5 / 7)
    assert scores["iou"] == [60.0, 50.0]


def test_absent_classes_do_not_count():
    matrix = confusion(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), 3)
    assert scores_from_confusion(matrix)["miou"] == 100.0
