"""Probes: patch labels, the linear classifier and k-NN by hand."""

from __future__ import annotations

import numpy as np
import torch

from sinkless.tasks.data import IGNORE
from sinkless.tasks.probe import fit_linear, knn_accuracy, patch_labels


def test_patch_labels_take_the_majority_and_ignore_padding():
    mask = np.zeros((4, 5), dtype=np.uint8)  # a 2 x 3 grid of 2-px patches covers 4 x 6: one column of padding
    mask[0:2, 0:2] = [[1, 1], [1, 0]]  # patch 0: three 1s
    mask[0:2, 2:4] = [[2, 2], [IGNORE, IGNORE]]  # patch 1: a tie between 2 and IGNORE -> the lower value
    mask[2:4, 4] = 3  # patch 5: two 3s and two padding pixels (a tie)
    labels = patch_labels(mask, (2, 3), 2)
    assert labels.tolist() == [1, 2, 0, 0, 0, 3]
    mask[0:2, 0:2] = IGNORE
    assert patch_labels(mask, (2, 3), 2)[0] == IGNORE
    assert patch_labels(mask[:, :4], (2, 3), 2)[2] == IGNORE  # a patch made of padding only


def test_linear_probe_separates_separable_classes_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    y = torch.arange(3).repeat(40)
    x = centres[y] + torch.randn(120, 3, generator=g) + 100.0  # a large offset: standardisation must cope
    head = fit_linear(x, y, 3, weight_decay=1e-3, steps=50)
    assert (head(x.double()).argmax(1) == y).float().mean() == 1.0
    again = fit_linear(x, y, 3, weight_decay=1e-3, steps=50)
    assert torch.equal(head.weight, again.weight)


def test_knn_leave_one_out_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05]])
    assert knn_accuracy(features, [0, 0, 1, 1, 0], k=1, temperature=0.07) == 100.0
    # mislabel image 4: it is the nearest neighbour of images 0 and 1, whose votes (k = 2) it now wins
    # by its higher similarity; its own two neighbours say 0; only images 2 and 3 stay right
    assert knn_accuracy(features, [0, 0, 1, 1, 1], k=2, temperature=0.07) == 40.0
