"""The public API on objects: sinkless.scan / find_register_neurons / TestTimeRegisters / load on a model the user holds."""

from __future__ import annotations

import hashlib
import importlib

import pytest
import torch

import sinkless
import sinkless.pretrained
from conftest import any_tiny_model, tiny_char_tokenizer, tiny_image_processor
from sinkless.errors import SinklessError
from sinkless.images import natural_crops

TEXTS = ["w1 w2 w3 w4 w5 w6 w7 w8", "w9 w8 w7 w6 w5", "w2 w4 w6 w8 w1 w3", "w5 w5 w1 w2 w3 w4 w5"]


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Everything a user could notice: weights and buffers, modes, hooks, attention implementation."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    modes = tuple(m.training for m in model.modules())
    configs = tuple(getattr(m.config, "_attn_implementation_internal", None) for m in model.modules() if hasattr(m, "config"))
    return digest.hexdigest(), hooks, modes, configs


def test_public_names():
    for name in ("load", "scan", "find_register_neurons", "TestTimeRegisters", "SinkCache", "Report", "ScanSettings", "SinklessError"):
        assert hasattr(sinkless, name), name
        assert name in sinkless.__all__
    assert callable(sinkless.scan)
    from sinkless.scan import ScanSettings, scan  # the package keeps working

    assert ScanSettings is sinkless.ScanSettings and callable(scan)
    assert importlib.import_module("sinkless.scan") is sinkless.scan


def test_scan_a_plain_vision_model_with_its_processor():
    model = any_tiny_model("vit")
    report = sinkless.scan(model, natural_crops(3), tiny_image_processor("vit"), layers="1-2")
    assert isinstance(report, sinkless.Report)
    assert report.modality == "vision" and [row["layer"] for row in report.layers] == [1, 2]
    assert report.inputs[0]["image_size"] == [28, 28]


def test_scan_a_plain_language_model_and_bad_settings():
    model = any_tiny_model("mistral")
    tok = tiny_char_tokenizer()
    report = sinkless.scan(model, TEXTS[:2], tok, max_tokens=6)
    assert report.modality == "text" and all(i["tokens"] <= 6 for i in report.inputs)
    with pytest.raises(SinklessError, match="no tokenizer"):
        sinkless.scan(model, TEXTS)
    with pytest.raises(SinklessError, match="unknown scan settings"):
        sinkless.scan(model, TEXTS, tok, bogus=1)
    with pytest.raises(SinklessError, match="input not found"):  # a string for a vision model is a path
        sinkless.scan(any_tiny_model("vit"), ["some text"], tiny_image_processor("vit"))


def test_user_model_is_never_mutated_outside_a_context():
    """state_dict hash, modes, hooks and attention implementation: the same after scan, discovery, TTR and errors."""
    model = any_tiny_model("llama").train()  # the user left it in training mode
    tok = tiny_char_tokenizer()
    before = _fingerprint(model)
    report = sinkless.scan(model, TEXTS, tok)
    assert _fingerprint(model) == before
    threshold = 1.001 * report.layers[1]["norm_median"]  # random weights: half the tokens count as outliers
    neurons = sinkless.find_register_neurons(model, TEXTS, tok, top_k=2, threshold=threshold, detection_layer=1)
    assert _fingerprint(model) == before and neurons.top_k == 2
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model.eval()(ids).logits
    model.train()
    before = _fingerprint(model)
    ttr = sinkless.TestTimeRegisters(model, neurons)
    with pytest.raises(RuntimeError, match="inside"), ttr:
        assert _fingerprint(model)[1] > before[1], "hooks are on inside the context"
        raise RuntimeError("inside")
    assert _fingerprint(model) == before
    handle = ttr.attach()
    assert _fingerprint(model)[1] > before[1]
    handle.remove()
    assert _fingerprint(model) == before
    ttr.attach()
    ttr.remove()
    assert _fingerprint(model) == before
    with pytest.raises(SinklessError):  # a failing scan leaves nothing behind either
        sinkless.scan(model, TEXTS, tok, layers="9")
    assert _fingerprint(model) == before
    with torch.no_grad(), sinkless.TestTimeRegisters(model.eval(), []):
        same = model(ids).logits
    diff = (same - plain).abs().max()
    print(f"TTR with no neurons vs plain model: max diff {diff:.2e}")
    assert diff == 0


def test_ttr_on_a_plain_model_equals_ttr_on_loaded():
    model = any_tiny_model("dinov2")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    neurons = [(1, 3), (1, 7)]
    with torch.no_grad():
        with sinkless.TestTimeRegisters(model, neurons):
            a = model(pixel_values=pixels).last_hidden_state
        loaded = sinkless.pretrained.as_loaded(model, processor=False)
        with sinkless.TestTimeRegisters(loaded, neurons)():
            b = model(pixel_values=pixels).last_hidden_state
    assert a.shape[1] == 1 + 4 + 1 and torch.equal(a, b)


def test_two_tower_model_is_scanned_through_its_vision_tower():
    model = any_tiny_model("clip")
    before = _fingerprint(model)
    report = sinkless.scan(model, natural_crops(2), tiny_image_processor("clip"))
    assert report.modality == "vision" and len(report.layers) == 3
    assert _fingerprint(model) == before


def test_bf16_on_cpu_agrees_with_fp32():
    """Tolerance: norm statistics within 3 % relative, attention shares within 0.02 absolute."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        text = any_tiny_model("llama").to(dtype)
        vision = any_tiny_model("dinov2").to(dtype)
        results[dtype] = (
            sinkless.scan(text, TEXTS, tiny_char_tokenizer()),
            sinkless.scan(vision, natural_crops(4)),
        )
    worst_norm = worst_attention = 0.0
    for full, half in zip(results[torch.float32], results[torch.bfloat16]):
        for a, b in zip(full.layers, half.layers):
            worst_norm = max(worst_norm, abs(b["norm_median"] - a["norm_median"]) / a["norm_median"], abs(b["max_ratio"] - a["max_ratio"]) / a["max_ratio"])
            if a["first_token_attention"] is not None:
                worst_attention = max(worst_attention, abs(b["first_token_attention"] - a["first_token_attention"]))
    print(f"bf16 vs fp32 on CPU: worst relative norm difference {worst_norm:.4f}, worst first-token attention difference {worst_attention:.4f}")
    assert worst_norm < 0.03 and worst_attention < 0.02


def test_load_with_device_map_and_dtype(tmp_path):
    model = any_tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tiny_char_tokenizer().save_pretrained(tmp_path)
    loaded = sinkless.load(str(tmp_path), dtype="bfloat16", device_map="auto")  # accelerate places it (CPU here)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16 and loaded.info.get("device_map") == "auto"
    report = sinkless.scan(loaded, TEXTS[:1])
    assert report.layers[-1]["first_token_attention"] is not None


@pytest.mark.slow
def test_bf16_on_cpu_agrees_with_fp32_on_smollm2(smollm2):
    """A real sink: first-token attention within 0.02 absolute, median norms within 3 %, the same sink verdict."""
    import copy

    text = "The cat sat on the mat. It looked at the door, then at the window, and fell asleep in the sun."
    half = copy.deepcopy(smollm2.model).to(torch.bfloat16)
    full_report = sinkless.scan(smollm2, text)
    half_report = sinkless.scan(half, text, smollm2.tokenizer)
    attention = max(abs(a["first_token_attention"] - b["first_token_attention"]) for a, b in zip(full_report.layers, half_report.layers))
    norms = max(abs(a["norm_median"] - b["norm_median"]) / a["norm_median"] for a, b in zip(full_report.layers, half_report.layers))
    print(f"SmolLM2 bf16 vs fp32 (CPU): first-token attention max diff {attention:.4f}, median norm max rel diff {norms:.4f}")
    assert attention < 0.02 and norms < 0.03
    assert full_report.summary["has_first_token_sink"] == half_report.summary["has_first_token_sink"] is True


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ({"batch_size": -1}, "batch_size must be a whole number >= 1"),
    ({"layers": []}, "is empty"),
    ({"layers": [5]}, "name layers outside 0..2"),
    ({"rule": "foo"}, "unknown outlier rule 'foo'"),
    ({"threshold": -1}, "threshold must be a positive number"),
    ({"image_size": 0}, "image_size must be a whole number"),
])
def test_bad_scan_settings_through_the_api_are_one_error(settings, message):
    """What the CLI's flags refuse, the library refuses too (was: ValueError, IndexError, or layer 5 scanned as 1)."""
    model = any_tiny_model("vit")
    with pytest.raises(SinklessError, match=message):
        sinkless.scan(model, natural_crops(1), tiny_image_processor("vit"), **settings)


def test_empty_text_and_zero_tokens_through_the_api():
    model, tok = any_tiny_model("mistral"), tiny_char_tokenizer()
    with pytest.raises(SinklessError, match="text 0 is empty"):
        sinkless.scan(model, "", tok)
    with pytest.raises(SinklessError, match="max_tokens must be a whole number >= 1"):
        sinkless.scan(model, "w1 w2 w3", tok, max_tokens=0)


def test_compare_and_denoise_take_a_model_object():
    from sinkless.denoise import Stage1Settings, denoise_image
    from sinkless.tasks.compare import compare

    model = any_tiny_model("dinov2")
    comparison, _ = compare(model, "lost", "synthetic", ["none"], limit=2, progress=False, resamples=0)
    assert comparison.results[0].fix == "none"
    result = denoise_image(model, natural_crops(1)[0], Stage1Settings(views=2, steps=3))
    assert result.clean.shape == result.raw.shape


def test_ttr_on_a_language_model_refuses_generate_and_left_padding():
    from sinkless.registers import TestTimeRegisters

    model = any_tiny_model("llama")
    ids = torch.tensor([[5, 9, 3, 7, 1, 2]])
    with TestTimeRegisters(model, [(1, 3)]):
        with pytest.raises(SinklessError, match="position_ids, as model.generate"):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
        padded = torch.tensor([[0, 0, 5, 9], [5, 9, 3, 7]])
        with pytest.raises(SinklessError, match="left-padded batch"):
            model(input_ids=padded, attention_mask=(padded != 0).long())
        model(input_ids=ids)  # a plain forward still works
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
