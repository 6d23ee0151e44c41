"""Test-time registers: discovery on the planted tiny ViT, the intervention's hygiene and equivalences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAMILIES, any_tiny_model, tiny_inputs, tiny_model
from sinkless import planted, zoo
from sinkless.adapters import Modality, TokenLayout, adapter_for
from sinkless.cli import main
from sinkless.errors import SinklessError
from sinkless.images import natural_crops, to_pixels
from sinkless.registers import DiscoverySettings, MaxMode, RegisterNeurons, TestTimeRegisters, discover, load_neurons
from sinkless.scan import ImageInput

VISION = [f for f in FAMILIES if adapter_for(tiny_model(f)).modality is Modality.VISION]


def _handles(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _loaded(family: str) -> zoo.Loaded:
    model = tiny_model(family)
    return zoo.Loaded(f"tiny-{family}", model, adapter_for(model))


@pytest.fixture(scope="module")
def tiny_planted():
    return zoo.load("planted-vit-tiny")


@pytest.fixture(scope="module")
def tiny_found(tiny_planted):
    inputs = [ImageInput(f"c{i}", im) for i, im in enumerate(natural_crops(32, seed=11))]
    heldout = [ImageInput(f"h{i}", im) for i, im in enumerate(natural_crops(16, seed=12))]
    return discover(tiny_planted, inputs, heldout, progress=False)


def test_discovery_recovers_planted_neurons(tiny_planted, tiny_found):
    truth = planted.ground_truth(tiny_planted.model)
    chosen = {(n["layer"], n["neuron"]) for n in tiny_found.neurons[: tiny_found.top_k]}
    recovered = len(chosen & {(truth.layer, n) for n in truth.neurons}) / len(truth.neurons)
    print(f"recall of planted neurons within top_k={tiny_found.top_k}: {recovered:.2f}; sweep {tiny_found.sweep}")
    assert recovered >= 0.9
    assert tiny_found.highest_layer == truth.layer
    assert tiny_found.heldout["before"]["outlier_tokens"] > 0
    assert tiny_found.heldout["after"]["outlier_tokens"] == 0
    assert tiny_found.sweep[-1]["k"] == tiny_found.top_k and not tiny_found.sweep[-1]["has_artifacts"]


def test_registers_take_the_artifact(tiny_planted, tiny_found):
    model = tiny_planted.model
    pixels = to_pixels(natural_crops(8, seed=3), tiny_planted.image_spec)
    ttr = TestTimeRegisters(tiny_planted, tiny_found)
    adapter = tiny_planted.adapter
    sites = [adapter.residual_site(i) for i in range(adapter.num_layers(model))]
    from sinkless.hooks import hooks

    with torch.no_grad(), ttr(), hooks(model, capture=sites) as rec:
        out = model(pixels).last_hidden_state
    groups = ttr.split(out)
    assert groups["patches"].shape[1] == 64 and groups["test_time_registers"].shape[1] == 1
    for site in sites:
        norms = ttr.split(rec[site])["patches"].norm(dim=-1)  # (B, P)
        ratio = (norms.max(1).values / norms.median(1).values).max()
        assert ratio <= 3.0, f"{site}: max/median {ratio:.2f}"
    assert _handles(model) == 0


def test_empty_neuron_set_is_exactly_the_plain_model(family):
    loaded = _loaded(family)
    if loaded.modality is Modality.TEXT and not loaded.adapter.rotary:
        pytest.skip("test-time registers need a rotary causal LM")
    inputs = tiny_inputs(loaded.model)
    with torch.no_grad():
        plain = loaded.model(**inputs)[0]
        with TestTimeRegisters(loaded, [])():
            patched = loaded.model(**inputs)[0]
    diff = (patched - plain).abs().max().item()
    assert patched.shape == plain.shape and diff == 0, f"max diff {diff}"


@pytest.mark.parametrize("family", VISION)
def test_vision_registers_every_adapter(family):
    """Every vision family: one register appended, outputs split, batch == one at a time, hooks gone."""
    loaded = _loaded(family)
    model = loaded.model
    width = loaded.adapter.mlp_width(model)
    ttr = TestTimeRegisters(loaded, [(0, 1), (1, 3), (1, width - 1)])
    pixels = tiny_inputs(model, batch=3)["pixel_values"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(pixel_values=pixels).last_hidden_state
        with ttr():
            batched = model(pixel_values=pixels).last_hidden_state
            single = torch.cat([model(pixel_values=pixels[i : i + 1]).last_hidden_state for i in range(3)])
        after = model(pixel_values=pixels).last_hidden_state
    assert batched.shape[1] == plain.shape[1] + 1
    diff = (batched - single).abs().max().item()
    assert diff < 1e-5, f"batched vs one at a time: max diff {diff}"
    groups = ttr.split(batched)
    n_prefix = loaded.adapter.n_cls + loaded.adapter.n_registers(model)
    assert groups["patches"].shape[1] == plain.shape[1] - n_prefix == 4
    assert groups["test_time_registers"].shape[1] == 1
    assert torch.equal(after, plain)
    assert _handles(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_register_value_is_the_max_for_every_image():
    loaded = _loaded("dinov2")
    model = loaded.model
    ttr = TestTimeRegisters(loaded, [(1, 5), (1, 7)])
    site = loaded.adapter.mlp_hidden_site(1)
    pixels = tiny_inputs(model, batch=3)["pixel_values"]
    from sinkless.hooks import hooks

    seen = {}
    with torch.no_grad(), ttr():
        # capture the edited values by hooking again after the intervention's edit
        with hooks(model, capture=[f"{loaded.adapter.block(1)}.mlp.fc2:input"]) as rec:
            model(pixel_values=pixels)
        seen["edited"] = rec[site]
    with torch.no_grad(), hooks(model, capture=[site], edit={loaded.adapter.block_input_site(0): ttr._add_tokens}) as rec:
        model(pixel_values=pixels)
    raw = rec[site]  # (B, N+1, W) without the move
    edited = seen["edited"]
    for b in range(3):
        for neuron in (5, 7):
            values = raw[b, :-1, neuron]
            assert edited[b, -1, neuron] == pytest.approx(float(values[values.abs().argmax()]))
            assert torch.count_nonzero(edited[b, 1:-1, neuron]) == 0  # zero on patches
            assert edited[b, 0, neuron] == raw[b, 0, neuron]  # CLS untouched


def test_layer_max_mode():
    loaded = _loaded("vit")
    ttr = TestTimeRegisters(loaded, [(0, 1), (0, 2)], mode=MaxMode.LAYER)
    edit = ttr._move(0, [1, 2])
    hidden = torch.zeros(2, 6, 8)
    hidden[0, 2, 1], hidden[0, 3, 2] = 5.0, 7.0
    hidden[1, 4, 2] = 3.0
    out = edit(hidden)
    assert out[0, -1, 1] == out[0, -1, 2] == 7.0
    assert out[1, -1, 1] == out[1, -1, 2] == 3.0


def test_text_register_inserted_and_logits_aligned():
    loaded = _loaded("llama")
    model = loaded.model
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    ttr = TestTimeRegisters(loaded, [(0, 3), (1, 10)])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with ttr():
            patched = model(input_ids=ids, attention_mask=mask).logits
            unmasked = model(input_ids=ids).logits
    assert patched.shape == plain.shape
    assert torch.allclose(patched, unmasked, atol=1e-5)
    # the register sits after the first token: that token sees nothing new, every later one sees it
    assert torch.allclose(patched[:, 0], plain[:, 0], atol=1e-5)
    assert not torch.allclose(patched[:, 1:], plain[:, 1:])
    with torch.no_grad(), TestTimeRegisters(loaded, [(0, 3)], after_first=False)():
        before_first = model(input_ids=ids).logits
    assert before_first.shape == plain.shape and not torch.allclose(before_first[:, 0], plain[:, 0])
    assert _handles(model) == 0


def test_text_models_without_rotary_are_refused():
    with pytest.raises(SinklessError, match="absolute position"):
        TestTimeRegisters(_loaded("gpt2"), [(0, 1)])


def test_neurons_file_roundtrip_and_errors(tmp_path, tiny_found):
    path = tiny_found.save(tmp_path / "n.json")
    again = load_neurons(path)
    assert again.by_layer() == tiny_found.by_layer() and again.top_k == tiny_found.top_k
    data = json.loads(path.read_text())
    assert {"model", "detection_layer", "threshold", "top_k", "neurons", "sinkless_version"} <= set(data)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SinklessError, match="not valid JSON"):
        load_neurons(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(SinklessError, match="not a register-neurons file"):
        load_neurons(tmp_path / "wrong.json")
    with pytest.raises(SinklessError, match="not found"):
        load_neurons(tmp_path / "missing.json")
    with pytest.raises(SinklessError, match="layers"):
        TestTimeRegisters(_loaded("vit"), RegisterNeurons("x", [{"layer": 40, "neuron": 1, "score": 1.0}], top_k=1))


def test_no_artifacts_means_nothing_to_fix():
    clean = zoo.load("planted-vit-tiny-clean")
    inputs = [ImageInput(f"c{i}", im) for i, im in enumerate(natural_crops(16, seed=11))]
    found = discover(clean, inputs, inputs[:4], DiscoverySettings(), progress=False)
    assert found.neurons == [] and found.top_k == 0
    with torch.no_grad():
        pixels = to_pixels([i.image for i in inputs[:2]], clean.image_spec)
        plain = clean.model(pixels).last_hidden_state
        with TestTimeRegisters(clean, found)():
            patched = clean.model(pixels).last_hidden_state
    assert torch.equal(plain, patched)


def test_cli_fix_and_scan_with_registers(tmp_path, capsys):
    out = tmp_path / "neurons.json"
    assert main(["fix", "--model", "planted-vit-tiny", "--n-inputs", "24", "--n-heldout", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "register neurons" in printed and "held-out outlier tokens" in printed
    assert main(["scan", "--model", "planted-vit-tiny", "--registers", str(out), "--out", str(tmp_path / "scan")]) == 0
    report = json.loads((tmp_path / "scan" / "report.json").read_text())
    assert report["summary"]["has_artifacts"] is False
    assert report["settings"]["registers"]["top_k"] == json.loads(out.read_text())["top_k"]
    assert main(["scan", "--model", "planted-vit-tiny", "--registers", str(tmp_path / "nope.json"), "--out", str(tmp_path / "s2")]) == 2
    assert not (tmp_path / "s2").exists()


def test_text_register_with_kv_cache_prepended_once():
    """Chunked decoding with a cache: the register is prepended on the first call only, and the
    result equals one forward over the whole sequence (the register value is causal: a stored peak)."""
    from transformers import DynamicCache

    loaded = _loaded("llama")
    model = loaded.model
    neurons = RegisterNeurons("tiny-llama", [{"layer": 0, "neuron": 3, "score": 1.0, "peak": 2.5}, {"layer": 1, "neuron": 10, "score": 1.0, "peak": -0.7}], top_k=2)
    ttr = TestTimeRegisters(loaded, neurons)
    ids = torch.randint(1, 64, (2, 12))
    with torch.no_grad(), ttr():
        whole = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        parts = [model(input_ids=ids[:, i : i + 4], past_key_values=cache, use_cache=True).logits for i in range(0, 12, 4)]
    chunked = torch.cat(parts, 1)
    diff = (whole - chunked).abs().max().item()
    assert chunked.shape == whole.shape == (2, 12, 64)
    assert diff < 1e-4, f"chunked vs whole: max diff {diff}"
    assert cache.get_seq_length() == 13  # 12 tokens + 1 register
    assert _handles(model) == 0


# -- discovery inputs ------------------------------------------------------------------------------
def test_text_passages_are_consecutive_slices_of_hamlet():
    from sinkless.registers.inputs import text_passages
    from sinkless.streaming.text import read_text

    words = read_text().split()
    passages = text_passages(3, start=2, words=5)
    assert [p.name for p in passages] == ["hamlet[10:15]", "hamlet[15:20]", "hamlet[20:25]"]
    assert [p.text for p in passages] == [" ".join(words[10:15]), " ".join(words[15:20]), " ".join(words[20:25])]
    assert text_passages(1)[0].text == " ".join(words[:80])
    with pytest.raises(SinklessError, match="fewer than"):
        text_passages(2, start=len(words) // 80 + 1)


def test_discovery_inputs_hold_out_every_fourth_user_input(tmp_path):
    from sinkless.registers.inputs import discovery_inputs
    from sinkless.scan import TextInput  # noqa: F401

    text = zoo.Loaded("t", tiny_model("llama"), adapter_for(tiny_model("llama")))
    chosen, heldout = discovery_inputs(text, [], [f"text {i}" for i in range(9)], 0, 0)
    assert [t.text for t in heldout] == ["text 3", "text 7"]
    assert [t.text for t in chosen] == [f"text {i}" for i in (0, 1, 2, 4, 5, 6, 8)]
    chosen, heldout = discovery_inputs(text, [], ["a", "b"], 0, 0)
    assert [t.text for t in chosen] == ["a"] and [t.text for t in heldout] == ["b"]  # fewer than 4: the last
    with pytest.raises(SinklessError, match="at least 2 inputs"):
        discovery_inputs(text, [], ["only"], 0, 0)
    chosen, heldout = discovery_inputs(text, [], [], 3, 2)  # bundled passages: disjoint
    assert [p.name for p in chosen] == ["hamlet[0:80]", "hamlet[80:160]", "hamlet[160:240]"]
    assert [p.name for p in heldout] == ["hamlet[240:320]", "hamlet[320:400]"]
    vision = _loaded("vit")
    chosen, heldout = discovery_inputs(vision, [], [], 3, 2)
    assert [i.name for i in chosen] == ["crop0", "crop1", "crop2"] and [i.name for i in heldout] == ["heldout0", "heldout1"]
    assert chosen[0].image.tobytes() == natural_crops(1, seed=0)[0].tobytes()
    assert heldout[0].image.tobytes() == natural_crops(1, seed=1)[0].tobytes()



def test_discovery_inputs_from_files_and_their_errors(tmp_path):
    from sinkless.registers.inputs import discovery_inputs, text_passages
    from sinkless.streaming.text import read_text

    too_far = len(read_text().split()) // 80 + 1
    with pytest.raises(SinklessError, match=f"fewer than {too_far + 2} passages of 80 words"):
        text_passages(2, start=too_far)
    text = zoo.Loaded("t", tiny_model("llama"), adapter_for(tiny_model("llama")))
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text(f"file {i}", encoding="utf-8")
    chosen, heldout = discovery_inputs(text, [str(tmp_path / f"t{i}.txt") for i in range(3)], [], 0, 0)
    assert [t.text for t in chosen] == ["file 0", "file 1"] and [t.text for t in heldout] == ["file 2"]  # fewer than 4: the last
    chosen, heldout = discovery_inputs(text, [str(tmp_path / "t0.txt")], ["inline"], 0, 0)  # files and --text together
    assert sorted(t.text for t in chosen + heldout) == ["file 0", "inline"] and len(heldout) == 1
    with pytest.raises(SinklessError) as error:
        discovery_inputs(text, [], ["only"], 0, 0)
    assert error.value.problem == "need at least 2 inputs (one is held out to check the fix)"
    assert error.value.fix == "pass more files"
    images = []
    for i in range(2):
        natural_crops(2, seed=3)[i].save(tmp_path / f"im{i}.png")
        images.append(str(tmp_path / f"im{i}.png"))
    chosen, heldout = discovery_inputs(_loaded("vit"), images, [], 0, 0)  # a vision model reads image files
    assert isinstance(chosen[0], ImageInput) and chosen[0].image.size == natural_crops(1, seed=3)[0].size


# -- the intervention on hand-made MLP activations ---------------------------------------------------
def _edited_hidden(loaded, ttr, layer, planted, inputs):
    """The MLP hidden activations of ``layer`` after the intervention's edit, given planted ones."""
    from handmade import Plant
    from sinkless.hooks import hooks

    site = loaded.adapter.mlp_hidden_site(layer)
    with torch.no_grad(), Plant(loaded, hidden={layer: planted})(), ttr(), hooks(loaded.model, capture=[site]) as rec:
        loaded.model(**inputs)
    return rec[site]


def _ramp(n, width):
    """Neuron 5 fires 0.5 x token index, neuron 9 fires -token index (a negative firing neuron)."""
    h = torch.zeros(n, width)
    h[:, 5] = 0.5 * torch.arange(n)
    h[:, 9] = -torch.arange(n, dtype=torch.float32)
    return h


def test_vision_register_takes_each_neurons_signed_extreme():
    from handmade import tiny_vit

    loaded = tiny_vit()
    pixels = to_pixels([Image.new("RGB", (56, 56))], loaded.image_spec, 56)
    ttr = TestTimeRegisters(loaded, [(1, 5), (1, 9)])
    h = _edited_hidden(loaded, ttr, 1, _ramp, {"pixel_values": pixels})[0]  # (18, W): CLS, 16 patches, register
    assert h.shape[0] == 18
    assert h[17, 5] == 8.0 and h[17, 9] == -16.0  # the extremes over CLS and patches (the register's own 8.5 / -17 excluded)
    assert torch.count_nonzero(h[1:17, [5, 9]]) == 0  # zeroed on every patch
    assert h[0, 5] == 0.0 and h[0, 9] == 0.0 and h[3, 4] == 0.0  # CLS untouched (planted 0), other neurons too
    layer_mode = TestTimeRegisters(loaded, [(1, 5), (1, 9)], mode="layer")
    h = _edited_hidden(loaded, layer_mode, 1, _ramp, {"pixel_values": pixels})[0]
    assert h[17, 5] == h[17, 9] == -16.0  # one extreme per layer
    firing = TestTimeRegisters(loaded, [(1, 5)], only_firing=0.5)
    h = _edited_hidden(loaded, firing, 1, _ramp, {"pixel_values": pixels})[0]
    # zeroed only where |a| >= 0.5 x 8 = 4: tokens 8..16; tokens 1..7 keep 0.5 x index
    assert h[1:8, 5].tolist() == [0.5 * t for t in range(1, 8)] and torch.count_nonzero(h[8:17, 5]) == 0
    assert torch.count_nonzero(h[1:17, 9]) == 16  # neuron 9 is not a register neuron here
    with pytest.raises(ValueError, match="n_registers must be >= 1"):
        TestTimeRegisters(loaded, [(1, 5)], n_registers=0)
    two = TestTimeRegisters(loaded, [(1, 5)], n_registers=2)
    h = _edited_hidden(loaded, two, 1, _ramp, {"pixel_values": pixels})[0]
    assert h.shape[0] == 19 and h[17, 5] == h[18, 5] == 8.0
    with pytest.raises(SinklessError, match=r"register neurons \[64\] are outside 0..63"):
        TestTimeRegisters(loaded, [(1, 64)])
    with pytest.raises(SinklessError, match=r"layers \[3\]"):
        TestTimeRegisters(loaded, [(3, 1)])


def _ones(n, width):
    return torch.ones(n, width)


@pytest.mark.parametrize(
    "after_first, keep_first, register, untouched",
    [(True, True, 1, [0]), (False, True, 0, [1]), (False, False, 0, [])],
)
def test_text_register_position_and_the_tokens_it_leaves_alone(after_first, keep_first, register, untouched):
    from handmade import tiny_lm

    loaded = tiny_lm()
    neurons = RegisterNeurons("hand-lm", [{"layer": 0, "neuron": 3, "score": 1.0, "peak": 2.5}], top_k=1)
    ttr = TestTimeRegisters(loaded, neurons, after_first=after_first, keep_first=keep_first)
    h = _edited_hidden(loaded, ttr, 0, _ones, {"input_ids": torch.arange(1, 7)[None]})[0]  # (7, W): 6 tokens + register
    assert h[register, 3] == 2.5  # the stored typical peak, not this call's maximum
    kept = [t for t in range(7) if t != register and h[t, 3] == 1.0]
    assert kept == untouched
    assert all(h[t, 3] == 0 for t in range(7) if t != register and t not in untouched)
    assert ttr.layout(7) == TokenLayout(7, 1 if after_first else 0, 1)



# -- the neurons file --------------------------------------------------------------------------------
def _entries():
    return [
        {"layer": 2, "neuron": 9, "score": 5.0, "peak": 3.0},
        {"layer": 0, "neuron": 4, "score": 4.0, "peak": -2.0},
        {"layer": 2, "neuron": 1, "score": 3.0, "peak": None},
        {"layer": 1, "neuron": 7, "score": 2.0, "peak": 1.0},
    ]


def test_register_neurons_top_k_layers_and_peaks():
    neurons = RegisterNeurons("m", _entries(), top_k=3)
    assert neurons.by_layer() == {0: [4], 2: [1, 9]}  # the first 3, sorted per layer, layers in order
    assert neurons.peaks() == {(2, 9): 3.0, (0, 4): -2.0}  # no stored peak: left out
    assert RegisterNeurons("m", _entries(), top_k=0).by_layer() == {0: [4], 1: [7], 2: [1, 9]}  # 0: all of them
    two = neurons.with_top_k(2)
    assert two.top_k == 2 and neurons.top_k == 3 and two.neurons == neurons.neurons and two.model == "m"
    assert neurons.with_top_k(10).top_k == 4


def test_register_neurons_from_dict_and_its_errors():
    data = {"model": "m", "neurons": [{"layer": 2, "neuron": 9.0}], "top_k": 1, "unknown": "ignored", "detection_layer": 3}
    neurons = RegisterNeurons.from_dict(data)
    assert neurons.neurons == [{"layer": 2, "neuron": 9, "score": 0.0, "peak": None}]
    assert neurons.top_k == 1 and neurons.detection_layer == 3 and neurons.model == "m"
    assert RegisterNeurons.from_dict({"model": "m", "neurons": _entries()}).top_k == 4  # default: all
    for bad in ([], {"model": "m"}, {"neurons": []}):
        with pytest.raises(SinklessError, match="src is not a register-neurons file"):
            RegisterNeurons.from_dict(bad, "src")
    # issue 15 (hardening): wrong types are refused, a string "2" included, no longer converted
    for neuron in ({"layer": 1}, {"layer": "x", "neuron": 1}, {"layer": None, "neuron": 1}, {"layer": "2", "neuron": 9}):
        with pytest.raises(SinklessError, match=r"src: neurons\[0\](\.layer must be at least 0 \(a whole number\)| needs integer 'layer' and 'neuron')") as error:
            RegisterNeurons.from_dict({"model": "m", "neurons": [neuron]}, "src")
        assert "sinkless fix --out" in error.value.fix


FIX = "pass a file written by `sinkless fix --out` (or fix the field by hand)"
ONE = [{"layer": 1, "neuron": 3}]
NEURON_FILE_ERRORS = [  # (contents, problem, fix): every error names the file, the field and what to do
    ({"model": "m"}, "src is not a register-neurons file (no 'model'/'neurons')", "pass a file written by `sinkless fix --out`"),
    ({"model": "", "neurons": ONE}, "src: 'model' must be the model's name, got ''", FIX),
    ({"model": "m", "neurons": "1:3"}, "src: 'neurons' must be a list of {\"layer\", \"neuron\"} entries, got str", FIX),
    ({"model": "m", "neurons": [{"layer": 1, "neuron": -3}]}, "src: neurons[0].neuron must be at least 0 (a whole number), got -3", FIX),
    ({"model": "m", "neurons": ONE * 2}, "src: neurons[1]: layer 1 neuron 3 is listed twice", "list each neuron once"),
    ({"model": "m", "neurons": [{"layer": 1, "neuron": 3, "score": "high"}]}, "src: neurons[0].score must be a finite number, got 'high'", FIX),
    ({"model": "m", "neurons": [{"layer": 1, "neuron": 3, "peak": float("inf")}]}, "src: neurons[0].peak must be a finite number, got inf", FIX),
    ({"model": "m", "neurons": ONE, "top_k": 2}, "src: top_k must be a whole number from 1 to 1 (the neurons listed), got 2",
     "set top_k to how many of the listed neurons to use (1..1)"),
    ({"model": "m", "neurons": [], "top_k": 1}, "src: top_k must be a whole number from 0 to 0 (the neurons listed), got 1", FIX),
    ({"model": "m", "neurons": ONE, "highest_layer": 1.5}, "src: highest_layer must be at least 0 (a whole number), got 1.5", FIX),
    ({"model": "m", "neurons": ONE, "threshold": "x"}, "src: threshold must be a finite number, got 'x'", FIX),
    ({"model": "m", "neurons": ONE, "threshold": 0}, "src: threshold must be positive, got 0.0", FIX),
    ({"model": "m", "neurons": ONE, "rule": []}, "src: 'rule' must be a JSON object, got list", FIX),
    ({"model": "m", "neurons": ONE, "sweep": {}}, "src: 'sweep' must be a list, got dict", FIX),
    ({"model": "m", "neurons": ONE, "heldout": []}, "src: 'heldout' must be a JSON object, got list", FIX),
    ({"model": "m", "neurons": ONE, "settings": 3}, "src: 'settings' must be a JSON object, got int", FIX),
]


@pytest.mark.parametrize("data, problem, fix", NEURON_FILE_ERRORS, ids=[p.split(" must")[0].split(": ")[-1][:24] for _, p, _ in NEURON_FILE_ERRORS])
def test_every_neurons_file_error_names_the_field_and_the_fix(data, problem, fix):
    with pytest.raises(SinklessError) as error:
        RegisterNeurons.from_dict(data, "src")
    assert (error.value.problem, error.value.fix) == (problem, fix)


def test_neurons_file_values_are_normalised_and_defaults_filled():
    data = {"model": "m", "neurons": [{"layer": 1, "neuron": 3, "score": None, "peak": 2}], "top_k": None,
            "threshold": 0.5, "highest_layer": 2.0, "detection_layer": 1, "sweep": [], "heldout": {}, "settings": {}}
    neurons = RegisterNeurons.from_dict(data)
    assert neurons.neurons == [{"layer": 1, "neuron": 3, "score": 0.0, "peak": 2.0}] and neurons.top_k == 1  # top_k null: all
    assert neurons.threshold == 0.5 and type(neurons.highest_layer) is int and neurons.highest_layer == 2
    assert type(RegisterNeurons.from_dict({**data, "threshold": 3}).threshold) is float
    with pytest.raises(SinklessError) as error:
        RegisterNeurons.from_dict({"model": "m"})
    assert error.value.problem == "the file is not a register-neurons file (no 'model'/'neurons')"
    assert neurons.check_model("m") is True and neurons.check_model("other") is False


def test_load_neurons_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
    from pathlib import Path

    def error(path):
        with pytest.raises(SinklessError) as caught:
            load_neurons(path)
        return caught.value.problem, caught.value.fix

    assert error(tmp_path / "none.json") == (f"register-neurons file not found: {tmp_path / 'none.json'}",
                                             "create it with `sinkless fix --model NAME --out FILE`")
    assert error(tmp_path) == (f"{tmp_path} is a folder, not a register-neurons file", "pass the JSON file written by `sinkless fix --out`")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    problem, fix = error(tmp_path / "bad.json")
    assert problem.startswith(f"{tmp_path / 'bad.json'} is not valid JSON (") and fix == "pass a file written by `sinkless fix --out`"
    (tmp_path / "n.json").write_text(json.dumps({"model": "m", "neurons": "x"}), encoding="utf-8")
    assert error(tmp_path / "n.json")[0] == f"{tmp_path / 'n.json'}: 'neurons' must be a list of {{\"layer\", \"neuron\"}} entries, got str"

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert error(tmp_path / "n.json") == (f"cannot read {tmp_path / 'n.json'} (Permission denied)", "check its permissions")


def test_a_utf8_neurons_file_reads_under_any_locale(tmp_path):
    """The file is UTF-8 whatever the user's locale (here ASCII, as on a C locale without coercion; cp1252 on Windows)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "n.json"
    path.write_text(json.dumps({"model": "modèle-ü", "neurons": []}, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = "import sys; from sinkless.registers import load_neurons; print(ascii(load_neurons(sys.argv[1]).model))"
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, check=False)
    assert out.stdout.strip() == ascii("modèle-ü"), out.stderr[-2000:]
    assert load_neurons(path).model == "modèle-ü"  # in this process too (mutmut links the test to load_neurons through it)

def test_zero_neurons_zero_everywhere_and_come_off():
    from handmade import tiny_vit
    from sinkless.hooks import hooks
    from sinkless.registers import ZeroNeurons

    loaded = tiny_vit()
    pixels = to_pixels([Image.new("RGB", (56, 56))], loaded.image_spec, 56)
    site = loaded.adapter.mlp_hidden_site(1)
    with torch.no_grad(), hooks(loaded.model, capture=[site]) as plain:
        loaded.model(pixel_values=pixels)
    with torch.no_grad(), ZeroNeurons(loaded, [(1, 5), (1, 9)])(), hooks(loaded.model, capture=[site]) as rec:
        loaded.model(pixel_values=pixels)
    h = rec[site]
    assert h.shape == plain[site].shape  # no token added
    assert torch.count_nonzero(h[..., [5, 9]]) == 0
    assert torch.equal(h[..., :5], plain[site][..., :5]) and torch.equal(h[..., 10:], plain[site][..., 10:])
    assert _handles(loaded.model) == 0


# -- the intervention: what mutation testing found unguarded --------------------------------------------
def test_registers_on_a_model_object_the_user_holds():
    """A bare HF model (no tokenizer, no processor) is edited exactly like its ``Loaded``; ``remove()`` takes it off."""
    for family, neurons in (("llama", [(0, 3)]), ("vit", [(1, 3)])):
        loaded = _loaded(family)
        model = loaded.model
        inputs = tiny_inputs(model, batch=2)
        with torch.no_grad():
            with TestTimeRegisters(loaded, neurons)():
                expected = model(**inputs)[0]
            ttr = TestTimeRegisters(model, neurons)  # the model object itself: nothing needed to feed it
            assert ttr.loaded.model is model and ttr.loaded.processor is None and ttr.loaded.tokenizer is None
            ttr.attach()
            got = model(**inputs)[0]
            ttr.remove()
        assert torch.equal(got, expected) and _handles(model) == 0, family


def test_unsupported_text_models_and_foreign_neurons_name_the_fix():
    def error(loaded, neurons):
        with pytest.raises(SinklessError) as caught:
            TestTimeRegisters(loaded, neurons)
        return caught.value.problem, caught.value.fix

    assert error(_loaded("bert"), [(0, 1)]) == ("test-time registers for bert are not supported", "use a causal LM (Llama, Qwen3) or a vision model")
    problem, fix = error(_loaded("gpt2"), [(0, 1)])
    assert problem.startswith("test-time registers need a model whose positions follow the sequence length") and fix == "use a rotary causal LM (Llama, Qwen3)"
    assert error(_loaded("vit"), [(3, 1), (5, 0)]) == (
        "register neurons name layers [3, 5] but tiny-vit has 3 (0..2)", "use the neurons file made for this model")
    assert error(_loaded("vit"), [(0, n) for n in range(64, 70)]) == (
        "register neurons [64, 65, 66, 67, 68] are outside 0..63, the MLP width of tiny-vit", "use the neurons file made for this model")
    assert TestTimeRegisters(_loaded("vit"), [(0, 0), (2, 63)]).layers == {0: [0], 2: [63]}  # the first and last neuron exist


def test_a_register_before_the_first_token_keeps_that_token_by_default():
    from handmade import tiny_lm

    loaded = tiny_lm()
    neurons = RegisterNeurons("hand-lm", [{"layer": 0, "neuron": 3, "score": 1.0, "peak": 2.5}], top_k=1)
    h = _edited_hidden(loaded, TestTimeRegisters(loaded, neurons, after_first=False), 0, _ones, {"input_ids": torch.arange(1, 7)[None]})[0]
    assert h[0, 3] == 2.5 and h[1, 3] == 1.0 and torch.count_nonzero(h[2:, 3]) == 0  # register, first token kept, the rest zeroed

def test_a_text_model_without_stored_peaks_says_so(caplog):
    import logging

    peaks = RegisterNeurons("tiny-llama", [{"layer": 0, "neuron": 3, "score": 1.0, "peak": 2.5}], top_k=1)
    for loaded, neurons, said in ((_loaded("llama"), [(0, 3)], True), (_loaded("llama"), peaks, False), (_loaded("vit"), [(0, 3)], False),
                                  (_loaded("llama"), [], False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sinkless.registers.ttr"):
            TestTimeRegisters(loaded, neurons)
        assert ("no stored peak activations" in caplog.text) is said, (loaded.name, neurons)


def test_vision_layout_and_split_with_trained_registers():
    loaded = _loaded("dinov2_with_registers")  # CLS, 2 trained registers, 2x2 patches
    ttr = TestTimeRegisters(loaded, [(1, 5)])
    assert ttr.layout(1 + 2 + 8 + 1, (28, 56)) == TokenLayout(12, 1, 2, (2, 4), 1)  # a non-square image: its own grid
    hidden = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    groups = ttr.split(hidden)
    assert list(groups) == ["cls", "registers", "patches", "test_time_registers"]
    assert [groups[k].shape[1] for k in groups] == [1, 2, 4, 1] and torch.equal(groups["registers"], hidden[:, 1:3])
    pixels = tiny_inputs(loaded.model, batch=1)["pixel_values"]
    h = _edited_hidden(loaded, ttr, 1, _ramp, {"pixel_values": pixels})[0]  # (8, W)
    assert h[:3, 5].tolist() == [0.0, 0.5, 1.0]  # CLS and the trained registers are left alone
    assert torch.count_nonzero(h[3:7, 5]) == 0 and h[7, 5] == 3.0  # patches zeroed; the register takes their extreme


def test_only_firing_compares_each_neuron_with_its_own_peak():
    from handmade import tiny_lm, tiny_vit

    loaded = tiny_vit()
    pixels = to_pixels([Image.new("RGB", (56, 56))] * 2, loaded.image_spec, 56)  # a batch of two
    firing = TestTimeRegisters(loaded, [(1, 5), (1, 9)], only_firing=0.5)
    for h in _edited_hidden(loaded, firing, 1, _ramp, {"pixel_values": pixels}):
        # neuron 5 peaks at 8 -> zeroed where |a| >= 4 (tokens 8..16); neuron 9 peaks at -16 -> where |a| >= 8
        assert h[1:8, 5].tolist() == [0.5 * t for t in range(1, 8)] and torch.count_nonzero(h[8:17, 5]) == 0
        assert h[1:8, 9].tolist() == [-float(t) for t in range(1, 8)] and torch.count_nonzero(h[8:17, 9]) == 0
    text = tiny_lm()
    peaks = RegisterNeurons("hand-lm", [{"layer": 0, "neuron": 3, "score": 1.0, "peak": 2.5},
                                        {"layer": 0, "neuron": 7, "score": 1.0, "peak": -0.5}], top_k=2)
    ttr = TestTimeRegisters(text, peaks, only_firing=0.5)
    h = _edited_hidden(text, ttr, 0, _ones, {"input_ids": torch.arange(1, 7)[None].repeat(2, 1)})  # (2, 7, W)
    assert h[:, 1, 3].tolist() == [2.5, 2.5] and h[:, 1, 7].tolist() == [-0.5, -0.5]  # the stored peaks
    assert (h[:, 2:, 3] == 1.0).all() and (h[:, 2:, 7] == 0.0).all()  # |1| < 0.5 x 2.5 is kept, |1| >= 0.5 x 0.5 is zeroed


def test_text_registers_keep_every_tensor_on_the_model_device():
    """The stored peaks and masks follow the activations' device (``meta`` stands in for an accelerator here)."""
    model = tiny_model("llama").to("meta")
    loaded = zoo.Loaded("meta-llama", model, adapter_for(model))
    peaks = RegisterNeurons("meta-llama", [{"layer": 0, "neuron": 3, "score": 1.0, "peak": 2.5},
                                           {"layer": 0, "neuron": 7, "score": 1.0, "peak": -0.5}], top_k=2)
    for kwargs in ({}, {"only_firing": 0.5}, {"mode": "layer"}):
        with torch.no_grad(), TestTimeRegisters(loaded, peaks, **kwargs)():
            logits = model(input_ids=torch.ones(2, 5, dtype=torch.long, device="meta")).logits
        assert logits.shape == (2, 5, 64) and logits.device.type == "meta", kwargs


def test_a_cache_filled_before_the_registers_gets_none():
    """A cache that already holds tokens (here one, filled without the intervention) means a continued call:
    no register is inserted, the register neurons are zeroed on every new token."""
    from transformers import DynamicCache

    from sinkless.registers import ZeroNeurons

    loaded = _loaded("llama")
    model = loaded.model
    ids = torch.randint(1, 64, (2, 4))
    with torch.no_grad():
        caches = []
        for _ in range(2):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
            caches.append(cache)
        with TestTimeRegisters(loaded, [(0, 3), (1, 10)])():
            got = model(input_ids=ids[:, 1:], past_key_values=caches[0], use_cache=True).logits
        with ZeroNeurons(loaded, [(0, 3), (1, 10)])():
            expected = model(input_ids=ids[:, 1:], past_key_values=caches[1], use_cache=True).logits
    torch.testing.assert_close(got, expected)
    assert caches[0].get_seq_length() == 4


def test_a_model_whose_embedding_cannot_be_found_is_a_clear_error():
    loaded = _loaded("llama")
    loaded.model.get_input_embeddings = lambda: torch.nn.Embedding(64, 32)  # not one of the model's modules
    ttr = TestTimeRegisters(loaded, [(0, 3)])
    with pytest.raises(SinklessError) as error:
        ttr.attach()
    assert error.value.problem == "cannot find the token embedding of LlamaForCausalLM"


def test_siglip2_padding_mask_grows_with_the_registers():
    """SigLIP2 pads an image's patches up to its patch budget: the registers are seen by every real patch and by
    the pooling head, the padding by none, so a padded image gives what the same image unpadded gives."""
    from conftest import any_tiny_model, tiny_image_processor
    from sinkless.registers import ZeroNeurons

    model = any_tiny_model("siglip2")
    processor = tiny_image_processor("siglip2")
    loaded = zoo.Loaded("siglip2", model, adapter_for(model), processor=processor)
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 84, 3), dtype=np.uint8))
    padded = dict(processor(images=[wide], max_num_patches=4, return_tensors="pt"))  # 1x3 patches and one pad
    exact = dict(processor(images=[wide], max_num_patches=3, return_tensors="pt"))  # the same 1x3 patches, no pad
    assert padded["spatial_shapes"].tolist() == exact["spatial_shapes"].tolist() == [[1, 3]]
    assert padded["pixel_attention_mask"].tolist() == [[1, 1, 1, 0]] and exact["pixel_attention_mask"].tolist() == [[1, 1, 1]]
    from handmade import Plant

    def planted(n, width):  # the register neurons peak on patch 1 (not on the padding: see the report of issue 15)
        h = torch.full((n, width), 0.1)
        h[1] = 2.0
        return h

    neurons = [(0, 3), (1, 10)]
    plant = Plant(loaded, hidden={0: planted, 1: planted})
    with torch.no_grad(), plant():
        with TestTimeRegisters(loaded, neurons, n_registers=2)():
            got, expected = model(**padded), model(**exact)  # the model with its attention-pooling head, which reads the mask too
        with ZeroNeurons(loaded, neurons)():
            ablated = model(**padded)
    assert got.last_hidden_state.shape[1] == 4 + 2 and expected.last_hidden_state.shape[1] == 3 + 2
    torch.testing.assert_close(got.last_hidden_state[0, [0, 1, 2, 4, 5]], expected.last_hidden_state[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got.last_hidden_state[0, :3], ablated.last_hidden_state[0, :3], atol=1e-3)  # the registers are seen
    assert _handles(model) == 0


def test_a_padding_mask_grows_with_the_registers_in_every_format():
    """Vision padding masks (SigLIP2) as the encoder or its pooling head may get them: 2D keep-masks (bool, int,
    float) and 4D masks (bool, or additive floats). The appended registers are seen by every token and see what
    the first token sees; the patches' own entries are left as they were."""
    ttr = TestTimeRegisters(_loaded("vit"), [(0, 1)], n_registers=2)
    keep = [[1, 1, 1, 0], [1, 1, 0, 0]]
    for dtype, on in ((torch.bool, True), (torch.long, 1), (torch.float32, 1.0)):
        mask = torch.tensor(keep).to(dtype)
        out = ttr._extend_vision_mask(mask)
        assert out.dtype == dtype and out.tolist() == [row + [on, on] for row in mask.tolist()]
    seen = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5  # (B, heads, N, N), rows differ
    additive = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
    for mask, on in ((seen, True), (additive, 0.0)):
        out = ttr._extend_vision_mask(mask)
        assert out.shape == (2, 2, 6, 6) and out.dtype == mask.dtype
        rows = torch.cat([mask, torch.full((2, 2, 4, 2), on, dtype=mask.dtype)], -1)  # every token sees the registers
        assert torch.equal(out[:, :, :4], rows)
        assert torch.equal(out[:, :, 4:], rows[:, :, :1].expand(2, 2, 2, 6))  # the registers see what token 0 sees
    assert ttr._extend_head_mask({"hidden_state": 1}) == {"hidden_state": 1}  # a head given no mask: nothing to grow
    grown = ttr._extend_head_mask({"hidden_state": 1, "attention_mask": torch.tensor(keep)})
    assert grown["hidden_state"] == 1 and grown["attention_mask"].tolist() == [row + [1, 1] for row in keep]


def test_the_pooling_head_that_reads_the_padding_mask_is_found():
    """SigLIP2's pooling head (beside its encoder, at the top level or nested under ``vision_model.`` as older
    transformers releases lay it out) takes the padding mask, so it must see the registers too; SigLIP's head
    takes none and a ViT has no head."""
    from sinkless.registers.ttr import _mask_reading_head

    assert adapter_for(any_tiny_model("siglip2")).blocks == "encoder.layers"  # this release: the tower at the top level
    assert _mask_reading_head(any_tiny_model("siglip2"), "encoder") == "head"
    assert _mask_reading_head(any_tiny_model("siglip_vision"), "encoder") is None  # its head takes no mask
    assert _mask_reading_head(tiny_model("vit"), "encoder") is None  # no head at all

    class Head(torch.nn.Module):
        def forward(self, hidden_state, attention_mask=None):
            return hidden_state

    for nested in (False, True):
        tower = torch.nn.Module()
        tower.encoder, tower.head = torch.nn.Identity(), Head()
        model = torch.nn.Module()
        if nested:
            model.vision_model = tower
        else:
            model = tower
        prefix = "vision_model." if nested else ""
        assert _mask_reading_head(model, f"{prefix}encoder") == f"{prefix}head"
        tower.head = torch.nn.Linear(2, 2)  # a head whose forward takes no mask
        assert _mask_reading_head(model, f"{prefix}encoder") is None
