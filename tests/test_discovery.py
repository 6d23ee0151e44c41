"""Register-neuron discovery on hand-made activations: which neurons win, with which scores, is known
by construction (tests/handmade.py plants norms and MLP activations into a tiny random ViT)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from handmade import Plant, tiny_vit
from sinkless.errors import SinklessError
from sinkless.registers import DiscoverySettings, discover
from sinkless.scan import ImageInput
from sinkless.scan.norms import OutlierRule

OUTLIER, SECOND = 5, 9  # tokens (CLS is token 0; 16 patches of a 56 px image)


def _images(n: int, prefix: str = "img") -> list[ImageInput]:
    return [ImageInput(f"{prefix}{i}", Image.new("RGB", (56, 56), (90 + 10 * i, 100, 110))) for i in range(n)]


def _norms(values: dict[int, float]):
    def norms(n: int) -> torch.Tensor:  # n: 17, or 18 with a test-time register appended
        out = torch.ones(n)
        for token, value in values.items():
            out[token] = value
        return out

    return norms


def _hidden(n: int, width: int) -> torch.Tensor:
    """Layer 0's MLP: neuron 7 fires 10 on the outlier token only, neuron 3 fires 2 on every token."""
    h = torch.zeros(n, width)
    h[OUTLIER, 7] = 10.0
    h[:, 3] = 2.0
    return h


def _plant(loaded, layer1=10.0, layer2=10.0):
    """Outliers: token 5 at layers 1 and 2, token 9 too at layer 2 (the layer with the most)."""
    norms = {0: _norms({}), 1: _norms({OUTLIER: layer1}), 2: _norms({OUTLIER: layer2, SECOND: layer2})}
    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    return Plant(loaded, norms=norms, hidden={0: _hidden, 1: zeros, 2: zeros})


def _discover(settings: DiscoverySettings, layer1=10.0, layer2=10.0, n=2):
    loaded = tiny_vit()
    with _plant(loaded, layer1, layer2)():
        return discover(loaded, _images(n), _images(1, "held"), settings, progress=False)


def test_neurons_are_scored_on_the_outlier_positions():
    found = _discover(DiscoverySettings(top_k=1, max_k=4))
    assert found.settings["outlier_fraction_per_layer"] == [0.0, 1 / 16, 2 / 16]
    assert found.detection_layer == 2  # the layer with the most outliers
    assert found.highest_layer == 1  # the first layer with outliers: neurons at or below it
    # at the detection layer's outliers (tokens 5 and 9) neuron 7 averages (10 + 0) / 2 = 5, neuron 3 averages 2;
    # over all 17 tokens neuron 7 would average 10 / 17 and lose to neuron 3
    best, second = found.neurons[:2]
    assert (best["layer"], best["neuron"], best["score"], best["peak"]) == (0, 7, 5.0, 10.0)
    assert (second["layer"], second["neuron"], second["score"], second["peak"]) == (0, 3, 2.0, 2.0)
    assert all(n["layer"] <= 1 for n in found.neurons) and len(found.neurons) == 4
    assert found.top_k == 1 and found.sweep == []
    # the planted norms stay whatever the registers do: held-out counts are what was planted
    assert found.heldout["before"]["outlier_tokens"] == 3 and found.heldout["after"]["outlier_tokens"] == 3
    assert found.heldout["before"]["outlier_layers"] == [1, 2] and found.heldout["before"]["has_artifacts"] is True
    assert found.heldout["before"]["per_layer"] == {0: 0, 1: 1, 2: 2}
    assert found.settings["n_inputs"] == 2 and found.settings["n_heldout"] == 1


def test_chosen_layers_override_the_defaults():
    found = _discover(DiscoverySettings(top_k=2, max_k=3, detection_layer=1, highest_layer=0))
    # detection layer 1 has one outlier (token 5): neuron 7 scores 10 there
    assert [(n["layer"], n["neuron"], n["score"]) for n in found.neurons[:2]] == [(0, 7, 10.0), (0, 3, 2.0)]
    assert all(n["layer"] == 0 for n in found.neurons) and len(found.neurons) == 3
    assert found.detection_layer == 1 and found.highest_layer == 0 and found.top_k == 2


def test_a_norm_exactly_at_the_threshold_is_not_an_outlier():
    at = _discover(DiscoverySettings(rule=OutlierRule(absolute=10.0), top_k=1), layer1=10.0, layer2=10.0)
    assert at.neurons == [] and at.top_k == 0  # nothing above 10: nothing to fix
    assert at.settings["outlier_fraction_per_layer"] == [0.0, 0.0, 0.0]
    assert at.heldout["before"]["outlier_tokens"] == 0 and at.heldout["after"] == at.heldout["before"]
    above = _discover(DiscoverySettings(rule=OutlierRule(absolute=10.0), top_k=1), layer1=10.5, layer2=10.5)
    assert above.settings["outlier_fraction_per_layer"] == [0.0, 1 / 16, 2 / 16]
    assert (above.neurons[0]["layer"], above.neurons[0]["neuron"]) == (0, 7)
    assert above.threshold == 10.0 and above.rule["absolute"] == 10.0


def test_sparsity_filter_drops_neurons_that_fire_everywhere():
    found = _discover(DiscoverySettings(top_k=1, max_k=200, sparsity=True))
    chosen = {(n["layer"], n["neuron"]) for n in found.neurons}
    assert (0, 7) in chosen and (0, 3) not in chosen  # neuron 3 is never quiet (|a| = 2 >= 0.5 everywhere)
    assert len(found.neurons) == 2 * 64 - 1
    assert found.settings["sparsity_filter"] is True


def test_sweep_tries_every_k_then_keeps_the_largest():
    # the planted outliers cannot be moved: every k of the sweep leaves artifacts, and max_k is kept
    found = _discover(DiscoverySettings(max_k=4))
    assert [step["k"] for step in found.sweep] == [1, 2, 3, 4]
    assert all(step["has_artifacts"] and step["outlier_tokens"] == 3 for step in found.sweep)
    assert found.top_k == 4


def test_a_rejected_k_stops_counting_once_its_verdict_is_settled():
    # 5 held-out images in batches of 2, each with the same 3 unmovable outliers (layers 1 and 2) out of 16 patches:
    # after the first batch 2 + 4 outliers over the 80 body tokens of all 5 are >= 0.2 % in two layers, whatever
    # the other 3 images hold: a rejected k stops there; the kept k (the last) is counted in full
    loaded = tiny_vit()
    with _plant(loaded)():
        found = discover(loaded, _images(2), _images(5, "held"), DiscoverySettings(max_k=3, batch_size=2), progress=False)
    assert [step["k"] for step in found.sweep] == [1, 2, 3]
    assert [step.get("inputs_measured") for step in found.sweep] == [2, 2, 2]
    assert [step["outlier_tokens"] for step in found.sweep] == [6, 6, 6] and all(step["has_artifacts"] for step in found.sweep)
    assert found.heldout["after"]["outlier_tokens"] == 15 and "complete" not in found.heldout["after"]  # the kept k: every image
    assert found.heldout["before"]["outlier_tokens"] == 15 and found.heldout["before"]["body_tokens"] == 80


def test_settled_follows_the_report_rule_with_the_whole_denominator():
    from types import SimpleNamespace

    from sinkless.registers.discovery import _settled

    def record(counts):  # one input: outliers per layer
        outliers = torch.zeros(len(counts), 16, dtype=torch.bool)
        for layer, count in enumerate(counts):
            outliers[layer, :count] = True
        return SimpleNamespace(layers=list(range(len(counts))), outliers=outliers)

    # 2 outliers in 1000 body tokens is exactly the 0.2 % floor: counts; 1 is not
    assert _settled([record([2, 2, 0])], 1000, text=False) is True
    assert _settled([record([2, 1, 0])], 1000, text=False) is False  # vision needs two layers
    assert _settled([record([2, 1, 0])], 1000, text=True) is True  # text: one layer is an artifact
    assert _settled([record([1, 1, 0]), record([1, 1, 0])], 1000, text=False) is True  # summed over inputs
    assert _settled([record([3])], 1000, text=False) is True  # a one-layer scan: one layer is enough
    assert _settled([record([2, 2])], 1001, text=False) is False  # the denominator is the whole set's


def test_no_input_with_outliers_at_the_chosen_detection_layer_is_an_error():
    # a user's choice (`fix --detection-layer`): a SinklessError (exit 2 with a fix), no longer a bare ValueError
    with pytest.raises(SinklessError, match="detection layer 0"):
        _discover(DiscoverySettings(top_k=1, detection_layer=0))


def test_scan_settings_of_discovery():
    settings = DiscoverySettings(rule=OutlierRule(absolute=3.0), batch_size=3, max_tokens=7).scan_settings()
    assert settings.rule == OutlierRule(absolute=3.0)
    assert (settings.batch_size, settings.max_tokens, settings.attention) == (3, 7, False)
    defaults = DiscoverySettings()
    assert (defaults.max_k, defaults.n_registers, defaults.top_k, defaults.sparsity) == (64, 1, None, False)


def test_discovery_is_quiet_without_progress(capsys):
    _discover(DiscoverySettings(top_k=1, max_k=2))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_text_discovery_scores_tokens_after_the_sink():
    """A causal LM: the first token (the model's sink) is never an outlier; positions are each text's own."""
    from handmade import tiny_lm, words
    from sinkless.scan import TextInput

    loaded = tiny_lm()

    def norms(n):  # the first token is huge (a sink), token 3 an outlier
        out = torch.ones(n)
        out[0], out[3] = 50.0, 10.0
        return out

    def hidden(n, width):
        h = torch.zeros(n, width)
        h[3, 11] = 4.0  # fires on the outlier
        h[0, 12] = 9.0  # fires on the sink only
        return h

    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    plant = Plant(loaded, norms={0: norms, 1: norms, 2: norms}, hidden={0: hidden, 1: zeros, 2: zeros})
    texts = [TextInput("a", words(8)), TextInput("b", words(6))]  # padded to 8 in one batch: each keeps its length
    with plant():
        found = discover(loaded, texts, [TextInput("h", words(5))], DiscoverySettings(top_k=1, max_k=3), progress=False)
    assert found.settings["outlier_fraction_per_layer"] == [2 / 12] * 3  # 7 + 5 body tokens, one outlier each
    assert (found.neurons[0]["layer"], found.neurons[0]["neuron"], found.neurons[0]["score"]) == (0, 11, 4.0)
    assert (0, 12) not in {(n["layer"], n["neuron"]) for n in found.neurons[:2]}
    assert found.heldout["before"]["has_artifacts"] is True and found.heldout["before"]["outlier_tokens"] == 3


def test_held_out_verdicts_follow_the_vision_rule():
    loaded = tiny_vit()
    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    # outliers in one layer only: counted, but not an artifact (it takes two layers)
    one_layer = Plant(loaded, norms={0: _norms({}), 1: _norms({OUTLIER: 10.0}), 2: _norms({})}, hidden={0: _hidden, 1: zeros, 2: zeros})
    with one_layer():
        found = discover(loaded, _images(2), _images(1, "held"), DiscoverySettings(top_k=1, max_k=2), progress=False)
    assert found.heldout["before"]["outlier_layers"] == [1] and found.heldout["before"]["has_artifacts"] is False
    # every token at norm 200 on one channel: "massive" by the language-model rule, yet no outlier at all
    uniform = lambda n: torch.full((n,), 200.0)  # noqa: E731
    flat = Plant(loaded, norms={0: uniform, 1: _norms({OUTLIER: 10.0}), 2: uniform}, hidden={0: _hidden, 1: zeros, 2: zeros})
    with flat():
        found = discover(loaded, _images(2), _images(1, "held"), DiscoverySettings(top_k=1, max_k=2), progress=False)
    assert found.heldout["before"]["has_artifacts"] is False and found.heldout["before"]["outlier_layers"] == [1]
