"""The faster register-neuron discovery gives exactly the results of the original implementation.

The reference below is the original code (per-image, per-layer float64 loops): neurons, scores, peaks,
the sweep and the held-out counts must be identical. The held-out counts go through the scan's own
measurement in both (``discovery._outlier_count``), so what is compared is the tally and the choice of k.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sinkless import zoo
from sinkless.adapters import Modality
from sinkless.hooks import hooks
from sinkless.images import natural_crops
from sinkless.registers import SWEEP, DiscoverySettings, TestTimeRegisters, discover
from sinkless.registers.discovery import _layouts, _outlier_count
from sinkless.registers.ttr import RegisterNeurons, _extreme
from sinkless.scan import ImageInput, TextInput
from sinkless.scan.measure import body_tokens, model_inputs
from sinkless.scan.norms import OutlierRule, thresholds
from sinkless.scan.report import MIN_FRACTION


@torch.no_grad()
def _reference_tally(loaded, inputs, settings):
    adapter, model = loaded.adapter, loaded.model
    L, W = adapter.num_layers(model), adapter.mlp_width(model)
    score_sum = torch.zeros(L, L, W, dtype=torch.float64)
    images = torch.zeros(L, dtype=torch.long)
    outliers = torch.zeros(L, dtype=torch.long)
    quiet = torch.zeros(L, W, dtype=torch.float64)
    peak_sum = torch.zeros(L, W, dtype=torch.float64)
    n_body = tokens = n_inputs = 0
    norm = lambda t: t.float().norm(dim=-1)  # noqa: E731
    capture = {adapter.residual_site(l): norm for l in range(L)}
    capture.update({adapter.mlp_hidden_site(l): None for l in range(L)})
    for start in range(0, len(inputs), settings.batch_size):
        batch = inputs[start : start + settings.batch_size]
        kwargs, lengths, image_hw, _ = model_inputs(loaded, batch, settings.scan_settings())
        with hooks(model, capture=capture) as rec:
            model(**kwargs)
        norms = torch.stack([rec[adapter.residual_site(l)] for l in range(L)], 1).cpu()
        for i, layout in enumerate(_layouts(loaded, norms.shape[-1], lengths, image_hw)):
            n = layout.n_tokens
            body = body_tokens(layout, text=loaded.modality is Modality.TEXT)
            tau = thresholds(norms[i, :, :n], settings.rule, body.expand(L, n))
            flagged = (norms[i, :, :n] > tau[:, None]) & body
            outliers += flagged.sum(-1)
            n_body += int(body.sum())
            signed = [rec[adapter.mlp_hidden_site(l)][i, :n].double().cpu() for l in range(L)]
            hidden = [h.abs() for h in signed]
            for l in range(L):
                quiet[l] += (hidden[l] < 0.5).sum(0)
                peak_sum[l] += _extreme(signed[l][body], dim=0)
            tokens += n
            n_inputs += 1
            for d in flagged.any(-1).nonzero().flatten().tolist():
                images[d] += 1
                for l in range(L):
                    score_sum[d, l] += hidden[l][flagged[d]].mean(0)
    return score_sum, images, outliers, quiet, peak_sum, n_body, tokens, n_inputs


def _reference_discover(loaded, inputs, heldout, settings):
    score_sum, images, outliers, quiet, peak_sum, n_body, tokens, n_inputs = _reference_tally(loaded, inputs, settings)
    L = len(images)
    fractions = [outliers[l].item() / max(n_body, 1) for l in range(L)]
    with_outliers = [l for l, f in enumerate(fractions) if f >= MIN_FRACTION]
    base = RegisterNeurons(model=loaded.name, neurons=[])
    if not with_outliers:
        return base, fractions
    detection = settings.detection_layer if settings.detection_layer is not None else max(with_outliers, key=lambda l: fractions[l])
    highest = with_outliers[0]
    scores = (score_sum[detection] / images[detection]).float()
    scores[highest + 1 :] = float("-inf")
    if settings.sparsity:
        scores[quiet / tokens < 0.5] = float("-inf")
    order = scores.flatten().argsort(descending=True)[: settings.max_k]
    width = scores.shape[1]
    peaks = (peak_sum / max(n_inputs, 1)).float()
    ranked = [
        {"layer": int(i // width), "neuron": int(i % width), "score": float(scores.flatten()[i]), "peak": float(peaks[i // width, i % width])}
        for i in order if torch.isfinite(scores.flatten()[i])
    ]
    found = replace(base, neurons=ranked, detection_layer=detection, highest_layer=highest)
    before = _outlier_count(loaded, heldout, settings)
    sweep, chosen = [], settings.top_k
    if chosen is None:
        for k in (k for k in SWEEP if k <= len(ranked)):
            after = _outlier_count(loaded, heldout, settings, intervention=TestTimeRegisters(loaded, found.with_top_k(k)))
            sweep.append({"k": k, "outlier_tokens": after["outlier_tokens"], "max_ratio": after["max_ratio"], "has_artifacts": after["has_artifacts"]})
            if not after["has_artifacts"]:
                chosen = k
                break
        chosen = chosen or min(settings.max_k, len(ranked))
    found = found.with_top_k(min(chosen, len(ranked)))
    found.sweep = sweep
    found.heldout = {"before": before, "after": _outlier_count(loaded, heldout, settings, intervention=TestTimeRegisters(loaded, found))}
    return found, fractions


def _same(new, reference, fractions):
    assert new.settings["outlier_fraction_per_layer"] == fractions
    assert new.neurons == reference.neurons  # ids, scores and peaks, bit for bit
    assert new.top_k == reference.top_k and new.detection_layer == reference.detection_layer
    # the sweep: the same k's and verdicts; a rejected k's count may stop once its verdict is settled (its
    # tokens are then a lower bound of the full count); a count that ran to the end is the full count exactly
    assert [(row["k"], row["has_artifacts"]) for row in new.sweep] == [(row["k"], row["has_artifacts"]) for row in reference.sweep]
    for row, full in zip(new.sweep, reference.sweep):
        if "inputs_measured" in row:
            assert row["has_artifacts"] and 0 < row["outlier_tokens"] <= full["outlier_tokens"], (row, full)
        else:
            assert row == full
    assert {k: v for k, v in new.heldout.items() if k != "checked_on"} == reference.heldout
    assert new.heldout["checked_on"] == "held-out inputs"


@pytest.fixture(scope="module")
def planted_tiny():
    return zoo.load("planted-vit-tiny")


@pytest.mark.parametrize(
    "settings",
    [DiscoverySettings(batch_size=5), DiscoverySettings(batch_size=8, sparsity=True), DiscoverySettings(top_k=3, max_k=16)],
    ids=["sweep", "sparsity", "fixed-k"],
)
def test_vision_discovery_identical(planted_tiny, settings):
    inputs = [ImageInput(f"c{i}", im) for i, im in enumerate(natural_crops(20, seed=0))]
    heldout = [ImageInput(f"h{i}", im) for i, im in enumerate(natural_crops(6, seed=1))]
    new = discover(planted_tiny, inputs, heldout, settings, progress=False)
    reference, fractions = _reference_discover(planted_tiny, inputs, heldout, settings)
    assert new.neurons and new.sweep or settings.top_k
    _same(new, reference, fractions)


def test_text_discovery_identical():
    """Text: padded batches of different lengths, and registers inserted after the first token in the sweep."""
    from conftest import tiny_model

    from sinkless.adapters import adapter_for
    from tests.test_zoo import _tiny_tokenizer

    model = tiny_model("llama")
    loaded = zoo.Loaded("tiny-llama", model, adapter_for(model), tokenizer=_tiny_tokenizer())
    texts = [TextInput(f"t{i}", " ".join(f"w{(i * 7 + j * 3) % 60}" for j in range(8 + 3 * i))) for i in range(9)]
    settings = DiscoverySettings(batch_size=4, rule=OutlierRule(floor=1.3, k=1.0))  # a low bar: outliers in a random model
    new = discover(loaded, texts[:6], texts[6:], settings, progress=False)
    reference, fractions = _reference_discover(loaded, texts[:6], texts[6:], settings)
    assert new.neurons and new.sweep
    _same(new, reference, fractions)
