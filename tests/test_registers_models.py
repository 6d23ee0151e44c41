"""Test-time registers on the bundled real models: planted-vit (known truth) and dinov2-s-focus (no artifacts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sinkless import planted, zoo
from sinkless.images import natural_crops, to_pixels
from sinkless.registers import TestTimeRegisters, discover
from sinkless.registers.inputs import discovery_inputs
from sinkless.scan import ImageInput, ScanSettings, scan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted_pair(focus):
    return zoo.load("planted-vit"), zoo.load("planted-vit-clean")


@pytest.fixture(scope="module")
def found(planted_pair):
    plant = planted_pair[0]
    inputs, heldout = discovery_inputs(plant, [], [], 64, 16)
    return discover(plant, inputs, heldout, progress=False)


def test_planted_neurons_recovered(planted_pair, found):
    truth = planted.ground_truth(planted_pair[0].model)
    chosen = {(n["layer"], n["neuron"]) for n in found.neurons[: found.top_k]}
    recall = len(chosen & {(truth.layer, n) for n in truth.neurons}) / len(truth.neurons)
    print(f"top_k {found.top_k}, recall {recall:.2f}, held-out {found.heldout}")
    assert recall >= 0.9
    assert found.heldout["after"]["outlier_tokens"] == 0 < found.heldout["before"]["outlier_tokens"]


def test_planted_registers_acceptance(planted_pair, found):
    """Held-out crops: max/median <= 1.5 at every layer (median over images), patches closer to the
    clean twin, CLS output cosine to the unpatched model >= 0.99."""
    plant, clean = planted_pair
    images = natural_crops(24, seed=777)
    items = [ImageInput(f"h{i}", image) for i, image in enumerate(images)]
    ttr = TestTimeRegisters(plant, found)
    report, _ = scan(plant, items, ScanSettings(attention=False), intervention=ttr, progress=False)
    ratios = [row["max_ratio"] for row in report.layers]
    print("max/median per layer with registers:", [round(r, 2) for r in ratios])
    assert not report.summary["has_artifacts"]
    assert max(ratios) <= 1.5

    pixels = to_pixels(images, plant.image_spec)
    with torch.no_grad():
        plain, twin = plant.model(pixels).last_hidden_state, clean.model(pixels).last_hidden_state
        with ttr():
            parts = ttr.split(plant.model(pixels).last_hidden_state)
    cls = F.cosine_similarity(parts["cls"][:, 0], plain[:, 0], dim=-1)
    before = F.cosine_similarity(plain[:, 1:], twin[:, 1:], dim=-1).mean()
    after = F.cosine_similarity(parts["patches"], twin[:, 1:], dim=-1).mean()
    print(f"CLS cosine to unpatched {cls.mean():.4f} (min {cls.min():.4f}); patch cosine to clean {before:.4f} -> {after:.4f}")
    assert cls.mean() >= 0.99
    assert after > before + 0.01


def test_focus_has_nothing_to_fix(focus):
    inputs, heldout = discovery_inputs(focus, [], [], 32, 8)
    found = discover(focus, inputs, heldout, progress=False)
    assert found.neurons == [] and found.top_k == 0
    pixels = to_pixels([item.image for item in heldout[:2]], focus.image_spec)
    with torch.no_grad():
        plain = focus.model(pixels).last_hidden_state
        with TestTimeRegisters(focus, found)():
            patched = focus.model(pixels).last_hidden_state
    assert torch.equal(plain, patched)


def test_smollm2_secondary_outliers_moved(smollm2):
    """SmolLM2's " the" outliers: with the registers no real token but the first exceeds 4x the layer
    median in layers 3-8 on held-out passages (they do without)."""
    inputs, heldout = discovery_inputs(smollm2, [], [], 32, 8)
    found = discover(smollm2, inputs, heldout, progress=False)
    print("neurons", found.neurons[: found.top_k], "held-out", found.heldout["before"]["outlier_tokens"], "->", found.heldout["after"]["outlier_tokens"])
    assert found.top_k > 0 and all(n["layer"] <= 3 for n in found.neurons[: found.top_k])

    def worst(report):
        return max(row["max_ratio_worst"] for row in report.layers if 3 <= row["layer"] <= 8)

    plain, _ = scan(smollm2, heldout, ScanSettings(attention=False), progress=False)
    fixed, _ = scan(smollm2, heldout, ScanSettings(attention=False), intervention=TestTimeRegisters(smollm2, found), progress=False)
    print(f"worst max/median in layers 3-8: {worst(plain):.2f} -> {worst(fixed):.2f}")
    assert worst(plain) > 4 >= worst(fixed)
