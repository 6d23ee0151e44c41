"""Converting HF models' attention: exact no-op conversions, removal, save / reload, gate layouts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_package, tiny_inputs, tiny_model

from sinkless.adapters import adapter_for
from sinkless.attention import (
    CONVERTIBLE,
    attention_probabilities,
    convert,
    export_fused_query,
    fuse_query_gate,
    load,
    load_fused_query,
    split_query_gate,
)
from sinkless.attention.convert import attention_modules
from sinkless.errors import SinklessError
from sinkless.hooks import hooks

FAMILIES = ("llama", "qwen3", "dinov2", "vit")


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["softmax", "gated", "sinklogit"])
def test_preserving_conversion_is_a_no_op(family, variant):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _run(model, inputs)
    handle = convert(model, variant)
    diff = _diff(_run(model, inputs), ref)
    tol = {"softmax": 0.0, "gated": 0.0, "sinklogit": 1e-5}[variant]  # gated: x2 folded, exact in floating point
    assert diff <= tol, f"{family} {variant}: max |diff| = {diff:.3e}"
    handle.remove()
    handle.remove()  # idempotent
    assert _diff(_run(model, inputs), ref) == 0.0
    assert not any(name.endswith((".sinks", "attn.gate_proj.weight", "attention.gate_proj.weight")) for name in model.state_dict())
    assert getattr(model.config, "sinkless_attention", None) is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["sigmoid", "elu1", "elu1norm"])
def test_other_variants_run_and_remove(family, variant):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _run(model, inputs)
    handle = convert(model, variant)
    out = _run(model, inputs)
    assert torch.isfinite(out).all() and _diff(out, ref) > 0
    handle.remove()
    assert _diff(_run(model, inputs), ref) == 0.0


def test_padding_mask_reaches_the_variant():
    """A padded batch row gives the same logits on its real tokens as the row alone (sigmoid, causal LM)."""
    model = tiny_model("llama")
    convert(model, "sigmoid", sigmoid_bias=-math.log(8))
    ids = torch.randint(1, 64, (1, 6))
    alone = model(input_ids=ids).logits
    batch = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    padded = torch.cat([batch, batch]).clone()
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[:, 6:] = 0
    out = model(input_ids=padded, attention_mask=mask).logits
    assert _diff(out[0, :6], alone[0]) < 1e-5


def test_generation_with_a_cache_matches_the_full_forward():
    model = tiny_model("llama")
    convert(model, "sinklogit", sink_init=0.5)
    ids = torch.randint(1, 64, (1, 8))
    full = model(input_ids=ids).logits[:, -1]
    out = model(input_ids=ids[:, :5], use_cache=True)
    cache = out.past_key_values
    for i in range(5, 8):
        out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    assert _diff(out.logits[:, -1], full) < 1e-5


@pytest.mark.parametrize("variant", ["softmax", "sigmoid", "sinklogit", "gated"])
def test_probabilities_are_captured_at_the_attention_site(variant):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    convert(model, variant, sink_init=0.0)
    inputs = tiny_inputs(model)
    site = adapter.attention_site(1)
    with attention_probabilities(model), hooks(model, capture=[site]) as rec:
        _run(model, inputs)
    probs = rec[site]  # (B, H, T, T)
    assert probs.shape == (2, 2, 7, 7)
    sums = probs.sum(-1)
    if variant in ("softmax", "gated"):
        assert (sums - 1).abs().max() < 1e-5
    elif variant == "sinklogit":
        assert (sums < 1).all()
    assert not hasattr(attention_modules(model)[0][1], "_sinkless_probs")


def test_softmax_conversion_of_the_real_smollm2_is_exact(smollm2):
    from sinkless.scan import sample_text

    model = smollm2.model
    ids = smollm2.tokenizer(sample_text(), return_tensors="pt")["input_ids"][:, :48]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for variant, tol in (("softmax", 0.0), ("gated", 0.0), ("sinklogit", 5e-3)):
            handle = convert(model, variant)
            try:
                diff = _diff(model(input_ids=ids).logits, ref)
            finally:
                handle.remove()
            assert diff <= tol, f"smollm2 {variant}: max |logit diff| = {diff:.3e}"
        assert _diff(model(input_ids=ids).logits, ref) == 0.0


@pytest.mark.parametrize("variant", ["sinklogit", "gated", "sigmoid"])
def test_converted_models_save_and_reload(variant, tmp_path):
    model = tiny_model("llama")
    convert(model, variant, init="random", sigmoid_bias=-2.0 if variant == "sigmoid" else None, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # make the new weights non-trivial
        for _, module in attention_modules(model):
            if hasattr(module, "sinks"):
                module.sinks.uniform_(-1, 1)
    inputs = tiny_inputs(model)
    ref = _run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.info["attention"]["variant"] == variant
    assert _diff(_run(loaded.model, inputs), ref) < 1e-6


def test_reload_of_a_folder_missing_the_new_weights_is_an_error(tmp_path):
    model = tiny_model("llama")
    model.config.sinkless_attention = {"variant": "gated", "sigmoid_bias": None, "gate": "elementwise"}
    model.save_pretrained(tmp_path)
    with pytest.raises(SinklessError, match="lack"):
        load(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "bert", "clip_vision"])
def test_unconvertible_families_are_clear_errors(family):
    model = tiny_model(family)
    with pytest.raises(SinklessError, match="cannot be converted"):
        convert(model, "sigmoid")
    assert model.config._attn_implementation != "sinkless_sigmoid"


def test_unknown_variant_and_double_conversion_are_errors():
    model = tiny_model("llama")
    with pytest.raises(SinklessError, match="unknown attention variant"):
        convert(model, "relu")
    convert(model, "softmax")
    with pytest.raises(SinklessError, match="already converted"):
        convert(model, "gated")


def test_a_failing_conversion_leaves_the_model_untouched():
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    ref = _run(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom

    original = torch.nn.Linear.__init__
    torch.nn.Linear.__init__ = explode
    try:
        with pytest.raises(Boom):
            convert(model, "gated")
    finally:
        torch.nn.Linear.__init__ = original
    assert set(model.state_dict()) == set(before)
    assert _diff(_run(model, inputs), ref) == 0.0
    assert getattr(model.config, "sinkless_attention", None) is None


# -- gate layouts --------------------------------------------------------------------------------
def _reference_gate_forward(fused_out, heads, kv_heads, head_dim, headwise):
    """How the reference repository reads its fused projection: (B, T, K, ·) split per KV group."""
    b, t, _ = fused_out.shape
    group = heads // kv_heads
    g = 1 if headwise else head_dim
    x = fused_out.view(b, t, kv_heads, -1)
    q, gate = torch.split(x, [group * head_dim, group * g], dim=-1)
    return q.reshape(b, t, heads, head_dim), gate.reshape(b, t, heads, g)


def _qwen3_next_gate_forward(fused_out, heads, head_dim):
    """How HF Qwen3-Next reads it: (B, T, H, 2d) chunked into [q_h | g_h]."""
    b, t, _ = fused_out.shape
    q, gate = torch.chunk(fused_out.view(b, t, heads, 2 * head_dim), 2, dim=-1)
    return q, gate


@pytest.mark.parametrize("layout,headwise", [("reference", False), ("reference", True), ("qwen3_next", False)])
def test_gate_layouts_round_trip_and_match_their_readers(layout, headwise):
    heads, kv_heads, head_dim, width = 4, 2, 3, 5
    g = 1 if headwise else head_dim
    fused = torch.randn(heads * (head_dim + g), width)
    queries, gates = split_query_gate(fused, heads=heads, kv_heads=kv_heads, head_dim=head_dim, layout=layout, headwise=headwise)
    again = fuse_query_gate(queries, gates, heads=heads, kv_heads=kv_heads, head_dim=head_dim, layout=layout, headwise=headwise)
    assert torch.equal(again, fused)
    x = torch.randn(2, 6, width)
    if layout == "reference":
        q_ref, g_ref = _reference_gate_forward(x @ fused.T, heads, kv_heads, head_dim, headwise)
    else:
        q_ref, g_ref = _qwen3_next_gate_forward(x @ fused.T, heads, head_dim)
    assert torch.allclose((x @ queries.T).view(2, 6, heads, head_dim), q_ref, atol=1e-6)
    assert torch.allclose((x @ gates.T).view(2, 6, heads, g), g_ref, atol=1e-6)


@pytest.mark.parametrize("layout,gate", [("reference", "elementwise"), ("reference", "headwise"), ("qwen3_next", "elementwise")])
def test_fused_checkpoints_load_into_a_gated_model(layout, gate):
    """Qwen3 (GQA): fused weights load and export unchanged (round trip), and the model's o_proj input is
    the plain model's (same queries) times sigmoid of the gate rows read the way the checkpoint's code reads them."""
    model = tiny_model("qwen3")
    plain = tiny_model("qwen3")  # same seed: same weights
    convert(model, "gated", gate=gate, init="none")
    modules = attention_modules(model)
    heads, head_dim = 2, 16
    g = 1 if gate == "headwise" else head_dim
    torch.manual_seed(1)
    fused = {f"{p}.q_proj.weight": torch.randn(heads * (head_dim + g), 32) * 0.2 for p, _ in modules}
    load_fused_query(model, fused, layout)
    exported = export_fused_query(model, layout)
    assert all(torch.equal(exported[k], fused[k]) for k in fused)
    with torch.no_grad():
        for (p, m), (_, m_plain) in zip(modules, attention_modules(plain)):
            m_plain.q_proj.weight.copy_(m.q_proj.weight)
    path = modules[0][0]
    x = torch.randn(1, 5, 32)
    sites = [f"{path}.q_proj:input", f"{path}.o_proj:input"]
    with torch.no_grad(), hooks(model, capture=sites) as rec, hooks(plain, capture=sites) as rec_plain:
        model(inputs_embeds=x)
        plain(inputs_embeds=x)
    fused_out = rec[sites[0]] @ fused[f"{path}.q_proj.weight"].T  # (1, 5, H*(d+g)) from the block's normed input
    if layout == "reference":
        _, gate_ref = _reference_gate_forward(fused_out, heads, 1, head_dim, gate == "headwise")
    else:
        _, gate_ref = _qwen3_next_gate_forward(fused_out, heads, head_dim)
    expected = rec_plain[sites[1]] * torch.sigmoid(gate_ref).expand(1, 5, heads, head_dim).reshape(1, 5, -1)
    assert _diff(rec[sites[1]], expected) < 1e-6


def test_fused_shapes_and_layout_names_are_validated():
    split_query_gate(torch.zeros(10, 4), heads=2, kv_heads=1, head_dim=4, layout="reference", headwise=True)  # 2 x (4 + 1) rows
    with pytest.raises(SinklessError, match="rows"):
        split_query_gate(torch.zeros(11, 4), heads=2, kv_heads=1, head_dim=4, layout="reference", headwise=True)
    with pytest.raises(SinklessError, match="unknown gate layout"):
        split_query_gate(torch.zeros(10, 4), heads=2, kv_heads=1, head_dim=4, layout="nope")
