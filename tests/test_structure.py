"""Adapters by structure: every family read from its module tree, attention read right (sinks, gates)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAMILIES, STRUCTURAL_FAMILIES, _tiny, any_tiny_model
from sinkless.adapters import ADAPTERS, Modality, adapter_for, eager_attention, rope_scaled
from sinkless.errors import SinklessError
from sinkless.hooks import hooks
from sinkless.structure import backbone, infer

# what structure must find in each family sinkless has no table entry for
EXPECTED = {
    "mistral": ("model.layers", "self_attn", "mlp.down_proj", "model.norm", True, True),
    "qwen2": ("model.layers", "self_attn", "mlp.down_proj", "model.norm", True, True),
    "gemma": ("model.layers", "self_attn", "mlp.down_proj", "model.norm", True, True),
    "gemma2": ("model.layers", "self_attn", "mlp.down_proj", "model.norm", True, True),
    "gemma3": ("model.layers", "self_attn", "mlp.down_proj", "model.norm", True, True),
    "phi3": ("model.layers", "self_attn", "mlp.down_proj", "model.norm", True, True),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", True, True),
    "opt": ("model.decoder.layers", "self_attn", "fc2", "model.decoder.final_layer_norm", True, False),
    "falcon": ("transformer.h", "self_attention", "mlp.dense_4h_to_h", "transformer.ln_f", True, True),
    "gpt_oss": ("model.layers", "self_attn", None, "model.norm", True, True),  # experts: no dense MLP
    "qwen3_next": ("model.layers", "self_attn", "mlp.down_proj", "model.norm", True, True),
    "clip_text": ("encoder.layers", "self_attn", "mlp.fc2", "final_layer_norm", False, False),
    "dinov3": ("model.layer", "attention", "mlp.down_proj", "norm", False, True),
    "siglip2": ("encoder.layers", "self_attn", "mlp.fc2", "post_layernorm", False, False),
    "clip": ("encoder.layers", "self_attn", "mlp.fc2", "post_layernorm", False, False),
    "vit_classifier": ("vit.layers", "attention", "mlp.fc2", "vit.layernorm", False, False),
    "dinov2_backbone": ("encoder.layer", "attention", "mlp.fc2", "layernorm", False, False),
}
VISION = {"dinov3", "siglip2", "clip", "vit_classifier", "dinov2_backbone"}


def test_every_structural_family_has_an_expectation():
    assert set(EXPECTED) == set(STRUCTURAL_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_agrees_with_the_table(family):
    """The explicit table is an override; structure alone finds the same places in its families."""
    model = _tiny(family)
    inferred, table = infer(model), ADAPTERS[family].bind(model)
    for key in ("modality", "blocks", "attention", "mlp_out", "final_norm", "n_cls", "causal", "rotary", "qkv"):
        assert getattr(inferred, key) == getattr(table, key), key
    # the table names a register-count field for ViT/CLIP/SigLIP too (set by add_registers): the same count either way
    assert inferred.n_registers(model) == table.n_registers(model)


@pytest.mark.parametrize("family", STRUCTURAL_FAMILIES)
def test_structural_family_is_recognised(family):
    model = any_tiny_model(family)
    adapter = adapter_for(backbone(model))
    blocks, attention, mlp_out, final_norm, causal, rotary = EXPECTED[family]
    assert adapter.inferred or family == "clip"  # its vision tower is a CLIPVisionModel: the table entry
    assert (adapter.blocks, adapter.attention, adapter.mlp_out, adapter.final_norm) == (blocks, attention, mlp_out, final_norm)
    assert (adapter.causal, adapter.rotary) == (causal, rotary)
    assert adapter.modality is (Modality.VISION if family in VISION else Modality.TEXT)
    assert adapter.num_layers(backbone(model)) == 3


def test_token_layouts_of_new_vision_families():
    dinov3 = adapter_for(any_tiny_model("dinov3"))
    assert (dinov3.n_cls, dinov3.n_registers(any_tiny_model("dinov3"))) == (1, 2)
    clip = any_tiny_model("clip")
    assert backbone(clip) is clip.vision_model and adapter_for(backbone(clip)).n_cls == 1
    assert adapter_for(any_tiny_model("siglip2")).n_cls == 0


@pytest.mark.parametrize("family", [f for f in FAMILIES + STRUCTURAL_FAMILIES if f not in VISION and f not in ("dinov2", "dinov2_with_registers", "vit", "clip_vision", "siglip_vision")])
def test_attention_site_holds_probabilities(family):
    """Eager attention read at the adapter's site: rows of probabilities over the keys (gpt-oss: less, the rest is its sink)."""
    model = any_tiny_model(family)
    adapter = adapter_for(model)
    layers = [l for l in range(3) if adapter.has_attention(model, l)]
    ids = torch.randint(3, 12, (2, 9), generator=torch.Generator().manual_seed(0))
    with eager_attention(model), hooks(model, capture=[adapter.attention_site(l) for l in layers]) as rec, torch.no_grad():
        model(input_ids=ids)
    for layer in layers:
        probs = rec[adapter.attention_site(layer)]  # (B, H, N, N)
        assert probs.shape[-2:] == (9, 9) and (probs >= 0).all()
        rows = probs.sum(-1)
        if adapter.sinks:
            assert (rows < 1 - 1e-4).all(), "gpt-oss rows leave out the learned sink's share"
        else:
            assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5), f"max |row sum - 1| {(rows - 1).abs().max():.2e}"


def test_gpt_oss_sink_logits_are_read():
    """The learned sink share follows the sink logits: huge logits take all attention, very negative ones none."""
    import sinkless
    from conftest import tiny_char_tokenizer

    model = any_tiny_model("gpt_oss")
    tok = tiny_char_tokenizer()
    text = "w1 w2 w3 w4 w5 w6"
    shares = {}
    for value in (-30.0, 0.0, 30.0):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(value)
        report = sinkless.scan(model, text, tok)
        shares[value] = ([row["learned_sink_attention"] for row in report.layers], [row["first_token_attention"] for row in report.layers])
    print({k: [round(x, 4) for x in v[0]] for k, v in shares.items()})
    assert max(shares[-30.0][0]) < 1e-6
    assert min(shares[30.0][0]) > 0.999 and max(shares[30.0][1]) < 1e-3
    assert 0.01 < min(shares[0.0][0]) < 0.99


def test_qwen3_next_gate_is_read_from_the_query_projection():
    """o_proj's input is (probabilities @ values) x sigmoid(gate), with the gate split as the adapter says."""
    model = any_tiny_model("qwen3_next")
    adapter = adapter_for(model)
    assert adapter.gate == "per_head_halves" and not adapter.has_attention(model, 0) and adapter.has_attention(model, 1)
    block = adapter.block(1)
    sites = [adapter.attention_site(1), f"{block}.{adapter.qkv[0]}:output", f"{block}.{adapter.qkv[2]}:output", f"{block}.self_attn.o_proj:input"]
    ids = torch.randint(0, 12, (1, 7), generator=torch.Generator().manual_seed(1))
    with eager_attention(model), hooks(model, capture=sites) as rec, torch.no_grad():
        model(input_ids=ids)
    probs, query, value, merged = (rec[s] for s in sites)  # (1,H,N,N), (1,N,2Hd), (1,N,kv·d), (1,N,H·d)
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    _, gate = adapter.split_query_gate(query, head_dim)
    kv_heads = value.shape[-1] // head_dim
    values = value.view(1, 7, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)  # (1, H, N, d)
    expected = (probs @ values).transpose(1, 2).reshape(1, 7, -1) * torch.sigmoid(gate)
    diff = (expected - merged).abs().max()
    print(f"max |o_proj input - (P V) sigmoid(gate)|: {diff:.2e}")
    assert diff < 1e-5


def test_experts_have_no_dense_mlp():
    adapter = adapter_for(any_tiny_model("gpt_oss"))
    assert adapter.mlp_out is None
    with pytest.raises(SinklessError, match="mixture of experts"):
        adapter.mlp_hidden_site(0)


def test_unsupported_model_names_what_is_missing():
    from transformers import MobileNetV1Config, MobileNetV1Model

    with pytest.raises(SinklessError) as info:
        adapter_for(MobileNetV1Model(MobileNetV1Config()))
    message = str(info.value)
    assert "unsupported architecture 'MobileNetV1Model'" in message and "ModuleList of transformer blocks" in message


def test_rope_scaled_divides_every_rotary_buffer_and_restores():
    model = any_tiny_model("gemma3")  # Gemma3 names its buffers per layer type
    names = [n for n, _ in model.named_buffers() if n.endswith("inv_freq") and "original" not in n]
    assert names, "Gemma3's rotary buffers"
    before = {n: b.clone() for n, b in model.named_buffers()}
    with rope_scaled(model, 4.0):
        for name in names:
            assert torch.allclose(dict(model.named_buffers())[name], before[name] / 4)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    with pytest.raises(SinklessError, match="no rotary"), rope_scaled(any_tiny_model("opt"), 2.0):
        pass


def test_attention_switch_restores_every_config_even_on_error():
    model = any_tiny_model("clip")
    before = [c._attn_implementation_internal for c in (model.config, model.config.vision_config, model.config.text_config)]
    with pytest.raises(RuntimeError), eager_attention(backbone(model)):
        assert backbone(model).config._attn_implementation == "eager"
        raise RuntimeError("inside")
    assert [c._attn_implementation_internal for c in (model.config, model.config.vision_config, model.config.text_config)] == before


def test_adapter_fields_are_stable():
    """Names other code relies on keep existing (issue-12, tasks, streaming)."""
    names = {f.name for f in dataclasses.fields(ADAPTERS["llama"])}
    assert {"blocks", "attention", "mlp_out", "final_norm", "n_cls", "registers_attr", "causal", "rotary", "patch_embed", "qkv"} <= names
    for method in ("residual_site", "mlp_hidden_site", "attention_site", "qkv_site", "block_input_site", "patch_embed_site", "layout", "n_registers"):
        assert callable(getattr(ADAPTERS["llama"], method))
