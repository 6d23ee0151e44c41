"""Register-neuron discovery on hand-made activations: which neurons win, with which scores, is known
by construction (tests/handmade.py plants norms and MLP activations into a tiny random ViT)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from handmade import Plant, tiny_vit
from sinkless.errors import SinklessError
from sinkless.registers import DiscoverySettings, discover
from sinkless.scan import ImageInput, TextInput
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


# -- what mutation testing found unguarded ----------------------------------------------------------
def test_peaks_are_each_neurons_signed_extreme_over_the_patches_alone():
    """The stored peak: each neuron's signed value of largest magnitude over the body tokens (never CLS),
    a tie of +v and -v keeping +v, averaged over the inputs."""
    loaded = tiny_vit()

    def hidden(n, width):
        h = _hidden(n, width)
        h[0, 20], h[1:17, 20] = 50.0, 1.0  # huge on CLS only: the patches' extreme is 1
        h[1, 21] = -30.0  # the first patch
        h[16, 22] = 40.0  # the last patch
        h[2, 23], h[3, 23] = 5.0, -5.0  # a tie: +5
        h[4, 24] = -20.0  # a neuron that fires negative
        return h

    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    plant = Plant(loaded, norms={0: _norms({}), 1: _norms({OUTLIER: 10.0}), 2: _norms({OUTLIER: 10.0})}, hidden={0: hidden, 1: zeros, 2: zeros})
    with plant():
        found = discover(loaded, _images(1), _images(1, "held"), DiscoverySettings(top_k=1, max_k=200), progress=False)
    peaks = {(n["layer"], n["neuron"]): n["peak"] for n in found.neurons}
    assert [peaks[(0, k)] for k in (7, 20, 21, 22, 23, 24)] == [10.0, 1.0, -30.0, 40.0, 5.0, -20.0]  # one input: its own extremes


def test_scores_and_peaks_add_up_in_double_precision(monkeypatch):
    """Per-input values are summed in float64: 2**24 + 1 + 1 over three inputs is not 2**24 (float32 would lose the ones)."""
    from sinkless.hooks import hooks

    loaded = tiny_vit()
    values = iter([2.0**24, 1.0, 1.0])

    def fire(h):  # one image a batch: neuron 7 fires the next value on the outlier token
        h = h.clone()
        h[:, OUTLIER, 7] = next(values, 0.0)
        return h

    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    plant = Plant(loaded, norms={0: _norms({}), 1: _norms({OUTLIER: 10.0}), 2: _norms({OUTLIER: 10.0})}, hidden={1: zeros, 2: zeros})
    with plant(), hooks(loaded.model, edit={loaded.adapter.mlp_hidden_site(0): fire}):
        found = discover(loaded, _images(3), _images(1, "held"), DiscoverySettings(top_k=1, max_k=1, batch_size=1), progress=False)
    expected = float(torch.tensor((2.0**24 + 2.0) / 3, dtype=torch.float64).float())
    assert (found.neurons[0]["layer"], found.neurons[0]["neuron"]) == (0, 7)
    assert found.neurons[0]["score"] == expected and found.neurons[0]["peak"] == expected


def test_detection_layer_is_the_one_with_the_most_outliers_not_the_last():
    loaded = tiny_vit()
    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    plant = Plant(loaded, norms={0: _norms({}), 1: _norms({OUTLIER: 10.0, SECOND: 10.0}), 2: _norms({OUTLIER: 10.0})},
                  hidden={0: _hidden, 1: zeros, 2: zeros})
    with plant():
        found = discover(loaded, _images(1), _images(1, "held"), DiscoverySettings(top_k=1, max_k=2, n_registers=2), progress=False)
    assert found.detection_layer == 1 and found.highest_layer == 1
    assert found.settings == {"n_inputs": 1, "n_heldout": 1, "sparsity_filter": False, "max_k": 2, "n_registers": 2,
                              "outlier_fraction_per_layer": [0.0, 2 / 16, 1 / 16]}


def test_discovery_errors_name_the_fix(monkeypatch):
    loaded = tiny_vit()

    def error(inputs, heldout, settings):
        with pytest.raises(SinklessError) as caught:
            discover(loaded, inputs, heldout, settings, progress=False)
        return caught.value.problem, caught.value.fix

    assert error([], _images(1), DiscoverySettings()) == ("no discovery inputs", "pass at least one input (or --n-inputs N >= 1)")
    assert error(_images(1), [], DiscoverySettings()) == (
        "no held-out inputs to check the fix on", "pass at least one held-out input (or --n-heldout N >= 1)")
    assert error(_images(1), _images(1), DiscoverySettings(detection_layer=3)) == (
        "detection layer 3 is not a layer of hand-vit (0..2)", "pick a layer from 0 to 2, or leave it out")
    assert error(_images(1), _images(1), DiscoverySettings(highest_layer=-1))[0] == "highest layer -1 is not a layer of hand-vit (0..2)"
    with _plant(loaded)():
        problem, fix = error(_images(1), _images(1), DiscoverySettings(top_k=1, detection_layer=0))
    assert (problem, fix) == ("no discovery input has outliers at detection layer 0",
                              "leave out the detection layer, or pick one with outliers: [1, 2]")


def test_discovery_shows_its_progress_by_default(capsys):
    loaded = tiny_vit()
    with _plant(loaded)():
        discover(loaded, _images(1), _images(1, "held"), DiscoverySettings(top_k=1, max_k=1))
    assert "finding register neurons" in capsys.readouterr().err


def test_the_sweep_builds_each_k_with_the_asked_registers_quietly(monkeypatch, capsys):
    from sinkless.registers import discovery

    built = []
    original = discovery.TestTimeRegisters

    def spy(loaded, neurons, **kwargs):
        built.append(kwargs.get("n_registers", 1))
        return original(loaded, neurons, **kwargs)

    monkeypatch.setattr(discovery, "TestTimeRegisters", spy)
    loaded = tiny_vit()
    with _plant(loaded)():
        found = discover(loaded, _images(1), _images(10, "held"), DiscoverySettings(max_k=2, n_registers=3, batch_size=4), progress=False)
    assert [s["k"] for s in found.sweep] == [1, 2] and built[1:] == [3, 3, 3]  # after the first check: each k, then the kept one
    assert capsys.readouterr().err == ""


def _sink_and_outlier_at_3(n):
    """Hand-made block-output norms of an n-token text: the sink at 0, one outlier at 3."""
    out = torch.ones(n)
    out[0], out[3] = 50.0, 10.0
    return out


def test_sparsity_keeps_a_neuron_quiet_on_exactly_half_the_tokens():
    """Text: 8 tokens, one input; a neuron with |a| < 0.5 on 4 of them is kept, on 3 dropped."""
    from handmade import tiny_lm, words
    from sinkless.scan import TextInput

    loaded = tiny_lm()

    def hidden(n, width):
        h = torch.full((n, width), 2.0)  # loud everywhere: dropped
        h[3, 11] = 4.0
        h[:4, 11] = 0.0  # quiet on 4 of 8 (the outlier token 3 included: 0 there)
        h[3, 11] = 0.0
        h[:, 12] = 0.0
        h[3, 12] = 4.0  # quiet on 7 of 8: kept, the winner
        h[:3, 13] = 0.0  # quiet on 3 of 8: dropped
        return h

    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    plant = Plant(loaded, norms={0: _sink_and_outlier_at_3, 1: _sink_and_outlier_at_3, 2: _sink_and_outlier_at_3},
                  hidden={0: hidden, 1: zeros, 2: zeros})
    with plant():
        found = discover(loaded, [TextInput("a", words(8))], [TextInput("h", words(5))],
                         DiscoverySettings(top_k=1, max_k=500, sparsity=True), progress=False)
    kept = {(n["layer"], n["neuron"]) for n in found.neurons}
    assert (0, 12) in kept and (0, 11) in kept and (0, 13) not in kept and (0, 5) not in kept
    assert (found.neurons[0]["layer"], found.neurons[0]["neuron"]) == (0, 12)


def test_an_outlier_fraction_of_exactly_the_floor_counts():
    """500 body tokens (a 501-token text) and one outlier: 0.2 %, the floor itself, counts; a one-token body divides by 1."""
    from handmade import tiny_lm, words
    from sinkless.scan import TextInput

    loaded = tiny_lm()

    def hidden(n, width):
        h = torch.zeros(n, width)
        h[3, 11] = 4.0
        return h

    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    plant = Plant(loaded, norms={0: _sink_and_outlier_at_3, 1: _sink_and_outlier_at_3, 2: _sink_and_outlier_at_3},
                  hidden={0: hidden, 1: zeros, 2: zeros})
    with plant():
        found = discover(loaded, [TextInput("a", words(501))], [TextInput("h", words(5))], DiscoverySettings(top_k=1, max_k=1), progress=False)
    assert found.settings["outlier_fraction_per_layer"] == [0.002] * 3 and found.neurons[0]["neuron"] == 11

    def two(n):  # a 2-token text: its one body token is the outlier
        out = torch.ones(n)
        out[1:2] = 10.0  # nothing in a one-token text
        return out

    def fires(n, width):
        h = torch.zeros(n, width)
        h[1:2, 11] = 4.0
        return h

    plant = Plant(loaded, norms={0: two, 1: two, 2: two}, hidden={0: fires, 1: zeros, 2: zeros})
    with plant():
        found = discover(loaded, [TextInput("a", words(2))], [TextInput("h", words(2))],
                         DiscoverySettings(rule=OutlierRule(absolute=5.0), top_k=1, max_k=1), progress=False)
    assert found.settings["outlier_fraction_per_layer"] == [1.0] * 3
    with plant():  # a one-token text (no body at all) beside it counts nothing
        found = discover(loaded, [TextInput("a", words(2)), TextInput("b", words(1))], [TextInput("h", words(2))],
                         DiscoverySettings(rule=OutlierRule(absolute=5.0), top_k=1, max_k=1, batch_size=1), progress=False)
    assert found.settings["outlier_fraction_per_layer"] == [1.0] * 3


def test_outlier_count_goes_batch_by_batch_and_stops_once_settled(monkeypatch):
    """_outlier_count on hand-made records: which batches it measures, with which settings and intervention."""
    from tests.test_report import text_record, vision_record

    from handmade import tiny_lm
    from sinkless.registers import discovery

    calls = []
    planted = {}

    def fake(loaded, inputs, settings, *, intervention=None, progress=True):
        calls.append(([i.name for i in inputs], settings, intervention, progress))
        return [planted[i.name] for i in inputs]

    monkeypatch.setattr(discovery, "measure_inputs", fake)
    settings = DiscoverySettings(rule=OutlierRule(absolute=5.0), batch_size=2)
    loaded, marker = tiny_vit(), object()
    for k in range(5):  # only the last image has outliers (two layers): nothing settles before it
        planted[f"i{k}"] = vision_record(f"i{k}", outliers_at={1: {5: 9.0}, 2: {5: 9.0}} if k == 4 else None)
    inputs = [ImageInput(f"i{k}", None) for k in range(5)]
    count = discovery._outlier_count(loaded, inputs, settings, intervention=marker, body_tokens=80)
    assert [c[0] for c in calls] == [["i0", "i1"], ["i2", "i3"], ["i4"]]
    assert all(c[1] == settings.scan_settings() and c[2] is marker and not c[3] for c in calls)
    assert count == {"outlier_tokens": 2, "outlier_layers": [1, 2], "max_ratio": count["max_ratio"], "has_artifacts": True,
                     "per_layer": {0: 0, 1: 1, 2: 1}, "body_tokens": 80}
    calls.clear()
    for k in range(5):  # every image has them: settled after the first batch
        planted[f"i{k}"] = vision_record(f"i{k}", outliers_at={1: {5: 9.0}, 2: {5: 9.0}})
    count = discovery._outlier_count(loaded, inputs, settings, intervention=marker, body_tokens=80)
    assert [c[0] for c in calls] == [["i0", "i1"]]
    assert set(count) == {"outlier_tokens", "outlier_layers", "max_ratio", "has_artifacts", "per_layer", "body_tokens", "complete",
                          "inputs_measured"}
    assert (count["complete"], count["inputs_measured"], count["has_artifacts"], count["outlier_tokens"]) == (False, 2, True, 4)
    calls.clear()
    count = discovery._outlier_count(loaded, inputs[:2], settings, intervention=marker)  # no total given: one call, all of it
    assert [c[0] for c in calls] == [["i0", "i1"]] and calls[0][2] is marker and calls[0][1] == settings.scan_settings()

    text = tiny_lm()  # text: one layer with outliers settles it, and that is the verdict (massive activations are not)
    for k in range(4):
        planted[f"t{k}"] = text_record(8, f"t{k}", outliers_at={1: {3: 9.0}})
    calls.clear()
    count = discovery._outlier_count(text, [TextInput(f"t{k}", "") for k in range(4)], settings, body_tokens=28)
    assert [c[0] for c in calls] == [["t0", "t1"]] and count["complete"] is False
    quiet = text_record(8, "q")
    quiet.massive = [{"layer": 1, "token": 0, "channel": 5, "value": 500.0}]
    planted["q"] = quiet
    assert discovery._outlier_count(text, [TextInput("q", "")], settings)["has_artifacts"] is False


@pytest.mark.parametrize("field, value, problem, fix", [
    ("max_k", 0, "max_k must be a whole number >= 1, got 0", None),
    ("batch_size", 2.5, "batch_size must be a whole number >= 1, got 2.5", None),
    ("n_registers", True, "n_registers must be a whole number >= 1, got True", None),
    ("max_tokens", -3, "max_tokens must be a whole number >= 1, got -3", None),
    ("top_k", 0, "top_k must be a whole number >= 1, got 0", "pass --top-k K with K >= 1, or leave it out for the sweep"),
    ("top_k", 1.5, "top_k must be a whole number >= 1, got 1.5", "pass --top-k K with K >= 1, or leave it out for the sweep"),
    ("top_k", False, "top_k must be a whole number >= 1, got False", "pass --top-k K with K >= 1, or leave it out for the sweep"),
    ("rule", OutlierRule(absolute=-1.0), "the outlier threshold must be a positive number, got -1.0", None),
    ("rule", OutlierRule(absolute=0.0), "the outlier threshold must be a positive number, got 0.0", None),
    ("rule", OutlierRule(absolute=3.4e38), "the outlier threshold must be a positive number, got 3.4e+38", None),
    ("rule", OutlierRule(absolute=float("nan")), "the outlier threshold must be a positive number, got nan", None),
])
def test_bad_discovery_settings_are_refused(field, value, problem, fix):
    with pytest.raises(SinklessError) as error:
        DiscoverySettings(**{field: value})
    assert (error.value.problem, error.value.fix) == (problem, fix)


def test_small_positive_thresholds_are_fine():
    assert DiscoverySettings(rule=OutlierRule(absolute=0.5)).rule.absolute == 0.5
    assert DiscoverySettings(top_k=1, max_k=1, batch_size=1, n_registers=1, max_tokens=1).top_k == 1


def test_layouts_give_each_image_its_own_grid():
    from conftest import any_tiny_model
    from sinkless import zoo
    from sinkless.adapters import TokenLayout, adapter_for
    from sinkless.registers.discovery import _layouts

    model = any_tiny_model("siglip2")  # patchified: one batch, each image its own grid, padding after
    loaded = zoo.Loaded("siglip2", model, adapter_for(model))
    assert _layouts(loaded, 4, [None, None], [(14, 42), (28, 28)]) == [TokenLayout(4, 0, 0, (1, 3), 1), TokenLayout(4, 0, 0, (2, 2), 0)]
    assert _layouts(loaded, 4, [None, None], (28, 28)) == [TokenLayout(4, 0, 0, (2, 2), 0)] * 2
    vit = tiny_vit()
    assert _layouts(vit, 1 + 8, [None], (28, 56)) == [TokenLayout(9, 1, 0, (2, 4), 0)]  # not the square a token count suggests


def _spied(monkeypatch):
    """Record the top_k of every test-time-registers intervention discover builds and every held-out count."""
    from sinkless.registers import discovery

    built, counts = [], []
    original_ttr, original_count = discovery.TestTimeRegisters, discovery._outlier_count

    def ttr(loaded, neurons, **kwargs):
        built.append(neurons.top_k if hasattr(neurons, "top_k") else len(neurons))
        return original_ttr(loaded, neurons, **kwargs)

    def count(loaded, inputs, settings, intervention=None, **kwargs):
        counts.append(None if intervention is None else len([n for ids in intervention.layers.values() for n in ids]))
        return original_count(loaded, inputs, settings, intervention, **kwargs)

    monkeypatch.setattr(discovery, "TestTimeRegisters", ttr)
    monkeypatch.setattr(discovery, "_outlier_count", count)
    return built, counts


def test_the_kept_k_is_counted_again_only_when_its_count_is_not_the_sweeps_last(monkeypatch):
    built, counts = _spied(monkeypatch)
    # max_k 4: the sweep tries 1, 2, 3, 4 (every one complete: 1 held-out image) and keeps 4, whose count it has
    found = _discover(DiscoverySettings(max_k=4))
    assert found.top_k == 4 and built == [0, 1, 2, 3, 4] and counts == [None, 1, 2, 3, 4]
    built.clear(), counts.clear()
    # max_k 5: the sweep tries 1..4 (6 > 5) and keeps 5, which it never tried: counted now, with its registers
    found = _discover(DiscoverySettings(max_k=5))
    assert found.top_k == 5 and built == [0, 1, 2, 3, 4, 5] and counts == [None, 1, 2, 3, 4, 5]
    assert found.heldout["after"]["outlier_tokens"] == 3
    built.clear(), counts.clear()
    # no neuron survives the sparsity filter: nothing to sweep, the empty set is counted
    loaded = tiny_vit()
    everywhere = lambda n, w: torch.full((n, w), 2.0)  # noqa: E731
    plant = Plant(loaded, norms={0: _norms({}), 1: _norms({OUTLIER: 10.0}), 2: _norms({OUTLIER: 10.0})},
                  hidden={0: everywhere, 1: everywhere, 2: everywhere})
    with plant():
        found = discover(loaded, _images(1), _images(1, "held"), DiscoverySettings(max_k=4, sparsity=True), progress=False)
    assert found.neurons == [] and found.sweep == [] and found.top_k == 0 and counts == [None, 0]


def test_padding_never_sets_a_peak():
    """SigLIP2 pads each image's patches to its budget: the padding's activations are not the image's."""
    from PIL import Image as PILImage

    from conftest import any_tiny_model, tiny_image_processor
    from sinkless import zoo
    from sinkless.adapters import adapter_for

    model = any_tiny_model("siglip2")
    loaded = zoo.Loaded("siglip2", model, adapter_for(model), processor=tiny_image_processor("siglip2"))
    wide = [ImageInput("wide", PILImage.new("RGB", (84, 28), (90, 100, 110)))]  # 2 x 6 patches of a 16-patch budget: 4 pads

    def norms(n):
        out = torch.ones(n)
        out[2] = 10.0
        return out

    def hidden(n, width):
        h = torch.zeros(n, width)
        h[2, 7] = 10.0  # the outlier's neuron
        h[:, 30] = 1.0
        h[12, 30] = 99.0  # the first pad
        h[0, 31], h[n - 1, 31] = 3.0, -99.0  # the first patch; the last pad
        return h

    zeros = lambda n, w: torch.zeros(n, w)  # noqa: E731
    plant = Plant(loaded, norms={0: _norms({}), 1: norms, 2: norms}, hidden={0: hidden, 1: zeros, 2: zeros})
    with plant():
        found = discover(loaded, wide, wide, DiscoverySettings(top_k=1, max_k=500), progress=False)
    peaks = {(n["layer"], n["neuron"]): n["peak"] for n in found.neurons}
    assert found.settings["outlier_fraction_per_layer"] == [0.0, 1 / 12, 1 / 12]  # 12 real patches
    assert (peaks[(0, 7)], peaks[(0, 30)], peaks[(0, 31)]) == (10.0, 1.0, 3.0)


def test_held_out_inputs_without_outliers_do_not_choose_top_k(monkeypatch, caplog):
    """k=1 "passed" on held-out images with no outliers and made the model worse: the sweep checks the discovery inputs."""
    import logging

    from sinkless.registers import discovery

    real = discovery._outlier_count

    def held_out_clean(loaded, inputs, settings, intervention=None, **kwargs):  # the held-out image shows no outliers
        result = real(loaded, inputs, settings, intervention=intervention, **kwargs)
        return {**result, "outlier_tokens": 0, "has_artifacts": False} if all(i.name.startswith("held") for i in inputs) else result

    monkeypatch.setattr(discovery, "_outlier_count", held_out_clean)
    with caplog.at_level(logging.WARNING):
        found = _discover(DiscoverySettings(max_k=4))
    assert "cannot check the choice of top_k" in caplog.text
    assert found.heldout["checked_on"].startswith("discovery inputs") and found.heldout["before"]["outlier_tokens"] > 0
    assert found.sweep and found.sweep[0]["outlier_tokens"] > 0  # k=1 is judged where there is something to remove
