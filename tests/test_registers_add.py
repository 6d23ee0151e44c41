"""``add_registers``: every pretrained weight kept, registers where the layout says, save/reload, no-op equivalences."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_inputs, tiny_model

from sinkless import cli, zoo
from sinkless.adapters import adapter_for
from sinkless.errors import SinklessError
from sinkless.registers import add_registers, remove_registers
from sinkless.registers.add import _to_dinov2_with_registers, restore_registers

VISION = ("dinov2", "dinov2_with_registers", "vit", "clip_vision", "siglip_vision")


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _has_hooks(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", VISION)
def test_every_pretrained_weight_kept_and_input_untouched(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_out = _out(model, inputs)
    new = add_registers(model, 3)
    state = new.state_dict()
    for name, tensor in before_state.items():
        if name.endswith("register_tokens"):  # a with-registers model keeps its registers first, then gets 3 more
            assert torch.equal(state[name][:, : tensor.shape[1]], tensor)
            continue
        assert torch.equal(state[name], tensor), name
    # the user's model is exactly as it was: weights, outputs, no hooks, config
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_state.items())
    assert torch.equal(_out(model, inputs), before_out) and not _has_hooks(model)
    assert adapter_for(model).n_registers(model) == (2 if family == "dinov2_with_registers" else 0)


@pytest.mark.parametrize("family", VISION)
def test_registers_sit_after_cls_and_the_layout_sees_them(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    old = adapter_for(model).n_registers(model)
    new = add_registers(model, 3, std=0.5, seed=1)
    adapter = adapter_for(new)
    out = _out(new, inputs)
    assert out.shape[1] == _out(model, inputs).shape[1] + 3
    layout = adapter.layout(new, out.shape[1], image_hw=(28, 28))
    assert layout.n_registers == old + 3 and layout.grid == (2, 2) and layout.n_body == 4
    assert layout.cls == slice(0, adapter.n_cls)
    # what enters block 0 at the register positions is the register tokens themselves (no position embedding)
    site = adapter.block_input_site(0)
    from sinkless.hooks import hooks

    with hooks(new, capture=[site]) as rec, torch.no_grad():
        new(**inputs)
    tokens = new.get_submodule(adapter.patch_embed.rpartition(".")[0]).register_tokens  # (1, R, D)
    entering = rec[site][:, layout.registers]  # (B, R, D)
    if family == "clip_vision":  # CLIP normalises the embeddings (pre_layrnorm) before block 0
        entering = rec[site][:, layout.registers]
        expected = new.pre_layrnorm(tokens.expand(2, -1, -1))
    else:
        expected = tokens.expand(2, -1, -1)
    diff = (entering - expected).abs().max().item()
    assert diff < 1e-6, f"max diff {diff:.3g}"


@pytest.mark.parametrize("family", ("vit", "clip_vision", "siglip_vision"))
def test_hooked_registers_remove_to_the_plain_model(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    new = add_registers(model, 2)
    assert _has_hooks(new)
    remove_registers(new)
    diff = (_out(new, inputs) - _out(model, inputs)).abs().max().item()
    assert diff == 0, f"max diff {diff:.3g}"
    assert not _has_hooks(new) and adapter_for(new).n_registers(new) == 0
    assert not any(n.endswith("register_tokens") for n in new.state_dict())
    with pytest.raises(SinklessError, match="carries no registers"):
        remove_registers(new)


def test_dinov2_conversion_with_no_registers_is_exact_at_the_native_size():
    """The class switch alone (no register): identical outputs where no position interpolation happens."""
    model = tiny_model("dinov2")  # image_size 28: the native grid is 2 x 2
    inputs = tiny_inputs(model)
    like = next(model.parameters())
    converted = _to_dinov2_with_registers(model, adapter_for(model), 0, 0.0, 0, like).eval()
    diff = (_out(converted, inputs) - _out(model, inputs)).abs().max().item()
    print(f"Dinov2Model -> Dinov2WithRegistersModel, 0 registers, native size: max |diff| {diff:.3g}")
    assert diff == 0, f"max diff {diff:.3g}"
    # at another size HF's registers class interpolates position embeddings with antialias=True: a measured difference
    bigger = {"pixel_values": torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))}
    diff = (_out(converted, bigger) - _out(model, bigger)).abs().max().item()
    print(f"... at 42 px (3 x 3 grid, interpolated): max |diff| {diff:.3g} (antialias=True in the registers class)")


@pytest.mark.parametrize("family", VISION)
def test_save_and_reload(tmp_path, family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    new = add_registers(model, 3, std=0.3).eval()
    expected = _out(new, inputs)
    new.save_pretrained(tmp_path)
    loaded = zoo.load(str(tmp_path))
    diff = (_out(loaded.model, inputs) - expected).abs().max().item()
    assert diff == 0, f"max diff {diff:.3g} after sinkless reload"
    assert loaded.adapter.n_registers(loaded.model) == adapter_for(new).n_registers(new)
    plain_class = getattr(transformers, type(new).__name__)
    plain = plain_class.from_pretrained(tmp_path).eval()
    if family.startswith("dinov2"):  # a native HF class: plain transformers, no sinkless, identical outputs
        assert type(plain).__name__ == "Dinov2WithRegistersModel"
        diff = (_out(plain, inputs) - expected).abs().max().item()
        assert diff == 0, f"max diff {diff:.3g} after plain transformers reload"
    else:  # plain transformers drops the hooked registers; sinkless puts them back on demand
        assert _out(plain, inputs).shape[1] == expected.shape[1] - 3
        restore_registers(plain, str(tmp_path))
        assert torch.equal(_out(plain, inputs), expected)


def test_reload_with_missing_register_weights_is_a_clear_error(tmp_path):
    model = tiny_model("vit")
    model.config.num_register_tokens = 2  # announced but never saved
    model.save_pretrained(tmp_path)
    with pytest.raises(SinklessError, match="announces 2 register tokens"):
        zoo.load(str(tmp_path))


@pytest.mark.parametrize("family", ("bert", "llama"))
def test_text_models_are_refused(family):
    with pytest.raises(SinklessError, match="text model"):
        add_registers(tiny_model(family), 4)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_counts_are_refused(n):
    with pytest.raises(SinklessError, match="whole number >= 1"):
        add_registers(tiny_model("vit"), n)


def test_unsupported_objects_are_refused():
    with pytest.raises(SinklessError, match="unsupported architecture"):
        add_registers(torch.nn.Linear(2, 2), 4)
    with pytest.raises(SinklessError, match="needs a model"):
        add_registers("dinov2-s-focus", 4)


@pytest.mark.parametrize("family", ("vit", "dinov2"))
def test_scan_reports_registers_apart_from_patches(family):
    """Scan reads registers through the adapter layout: norms reported apart, never counted as patches."""
    from PIL import Image

    from sinkless.images import ImageSpec
    from sinkless.scan import ImageInput, ScanSettings, scan

    model = add_registers(tiny_model(family), 3, std=0.5).eval()
    loaded = zoo.Loaded(f"tiny-{family}+registers", model, adapter_for(model), ImageSpec(size=28, patch_size=14))
    images = [ImageInput(f"im{i}", Image.new("RGB", (28, 28), (40 * i, 90, 200 - 30 * i))) for i in range(3)]
    report, records = scan(loaded, images, ScanSettings(), progress=False)
    assert all(r.layout.n_registers == 3 and r.layout.n_body == 4 for r in records)
    assert all("registers_norm_ratio" in row for row in report.layers)
    assert all(o["token"] < 4 for o in report.outliers)  # token indices are patch indices


def test_planted_tiny_weights_kept_and_plain_reload(tmp_path):
    loaded = zoo.load("planted-vit-tiny")
    pixels = {"pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    new = add_registers(loaded.model, 4).eval()
    state = new.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())
    new.save_pretrained(tmp_path)
    plain = transformers.Dinov2WithRegistersModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_out(plain, pixels), _out(new, pixels))
    assert plain.config.sinkless_plant["layer"] == loaded.model.config.sinkless_plant["layer"]  # ground truth travels along


def test_cli_is_not_needed_for_add_registers():
    assert "distill" in cli.VERBS


# -- read back exactly: messages, tokens, configs, stacking, reloading ------------------------------
SUPPORTED = "Dinov2Model, Dinov2WithRegistersModel, ViTModel, CLIPVisionModel or SiglipVisionModel"


def _register_tokens(model):
    from sinkless.registers.add import register_parameter_name

    return model.state_dict()[register_parameter_name(model)]


def test_refusals_read_in_full():
    from conftest import any_tiny_model

    with pytest.raises(SinklessError) as error:
        add_registers("dinov2-s-focus", 4)
    assert str(error.value) == "add_registers needs a model (torch module), got str\n  fix: pass loaded.model, or a model from transformers' from_pretrained"
    with pytest.raises(SinklessError) as error:
        add_registers(tiny_model("bert"), 4)
    assert str(error.value) == f"registers are tokens of a vision transformer; BertModel is a text model\n  fix: use a {SUPPORTED}"
    with pytest.raises(SinklessError) as error:
        add_registers(any_tiny_model("dinov3"), 4)
    assert str(error.value) == f"adding registers to DINOv3ViTModel is not supported (unsupported family 'dinov3_vit')\n  fix: use a {SUPPORTED}"
    with pytest.raises(SinklessError) as error:
        add_registers(tiny_model("vit"), 0)
    assert str(error.value) == "the number of registers must be a whole number >= 1, got 0\n  fix: e.g. 4 (Darcet et al.) or 16 (PH-Reg)"
    with pytest.raises(SinklessError) as error:
        add_registers(tiny_model("vit"), 2, std=-1.0)
    assert str(error.value) == "register init std must be >= 0, got -1.0"
    with pytest.raises(SinklessError) as error:
        remove_registers(tiny_model("vit"))
    assert str(error.value) == ("this ViTModel carries no registers added by sinkless\n"
                                "  fix: a Dinov2WithRegistersModel keeps its registers (they are part of the class)")


@pytest.mark.parametrize("family", ("vit_classifier", "dinov2_backbone"))
def test_models_with_a_head_or_a_backbone_wrapper_are_refused(family):
    """Their embeddings sit elsewhere (ViTForImageClassification: registers inside the patch embedding broke the
    model) or their class would be lost (Dinov2Backbone came back as a Dinov2WithRegistersModel)."""
    from conftest import any_tiny_model

    model = any_tiny_model(family)
    with pytest.raises(SinklessError, match="only the base vision models") as error:
        add_registers(model, 2)
    assert f"adding registers to {type(model).__name__} is not supported" in str(error.value)
    assert error.value.fix == f"pass its base model (e.g. model.vit), a {SUPPORTED}"


@pytest.mark.parametrize("family", VISION)
def test_one_register_is_enough(family):
    model = tiny_model(family)
    old = adapter_for(model).n_registers(model)
    new = add_registers(model, 1)
    assert adapter_for(new).n_registers(new) == old + 1 and _register_tokens(new).shape == (1, old + 1, 32)


@pytest.mark.parametrize("family", ("dinov2", "vit", "siglip_vision"))
def test_new_tokens_are_drawn_from_their_own_seeded_generator(family):
    torch.manual_seed(123)  # the global generator plays no part
    new = add_registers(tiny_model(family), 3, std=0.25, seed=7)
    expected = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(7)) * 0.25
    assert torch.equal(_register_tokens(new), expected)


def test_init_tokens_follow_the_reference_device_and_dtype():
    from sinkless.registers.add import _init_tokens

    like = torch.empty(0, dtype=torch.float64, device="meta")
    tokens = _init_tokens(2, 8, 0.5, 0, like)
    assert tokens.dtype == torch.float64 and tokens.device.type == "meta" and tokens.shape == (1, 2, 8)


def test_dinov2_conversion_writes_a_clean_registers_config():
    import transformers as T

    model = T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                         image_size=28, patch_size=14, mlp_ratio=2, attn_implementation="eager"))
    model.config.architectures = ["Dinov2Model"]
    new = add_registers(model, 3)
    config = new.config
    assert type(config).__name__ == "Dinov2WithRegistersConfig" and config.model_type == "dinov2_with_registers"
    assert "model_type" not in vars(config)  # the class's own, not a "dinov2" copied over
    assert config.architectures == ["Dinov2WithRegistersModel"] and config.num_register_tokens == 3
    assert config._attn_implementation == "eager"
    assert not hasattr(config, "use_mask_token")  # a Dinov2Config field the registers class does not have
    assert config.transformers_version == T.Dinov2WithRegistersConfig().transformers_version
    assert config.to_dict()["model_type"] == "dinov2_with_registers"


def test_dinov2_mask_token_is_kept_or_made():
    import transformers as T

    model = tiny_model("dinov2")
    with torch.no_grad():
        model.embeddings.mask_token.normal_()
    new = add_registers(model, 2)
    assert torch.equal(new.embeddings.mask_token, model.embeddings.mask_token)
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    bare = T.Dinov2Model(T.Dinov2Config(**common, use_mask_token=False))
    assert "embeddings.mask_token" not in bare.state_dict()
    new = add_registers(bare, 2)
    assert torch.equal(new.embeddings.mask_token, torch.zeros(1, 32)) and new.config.num_register_tokens == 2


def test_dinov2_register_counts_come_from_the_class():
    import transformers as T

    model = tiny_model("dinov2")
    model.config.num_register_tokens = 5  # a stray field: a Dinov2Model has no registers whatever its config says
    new = add_registers(model, 3)
    assert new.config.num_register_tokens == 3 and new.embeddings.register_tokens.shape == (1, 3, 32)
    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    none = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**common, num_register_tokens=0))
    new = add_registers(none, 2, seed=4)
    assert new.config.num_register_tokens == 2 and new.embeddings.register_tokens.shape == (1, 2, 32)


@pytest.mark.parametrize("family", ("vit", "clip_vision", "siglip_vision"))
def test_hooked_registers_stack(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    first = add_registers(model, 2, std=0.5, seed=1)
    second = add_registers(first, 3, std=0.5, seed=2)
    tokens = _register_tokens(second)
    assert tokens.shape == (1, 5, 32) and second.config.num_register_tokens == 5
    assert torch.equal(tokens[:, :2], _register_tokens(first))
    assert torch.equal(tokens[:, 2:], torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2)) * 0.5)
    assert first.config.num_register_tokens == 2 and getattr(model.config, "num_register_tokens", 0) == 0
    assert _out(second, inputs).shape[1] == _out(model, inputs).shape[1] + 5
    assert adapter_for(second).n_registers(second) == 5


def test_hooked_count_announced_without_weights_adds_only_the_new():
    """A folder saved with registers, loaded by plain transformers: the config announces 2, the weights hold none."""
    model = tiny_model("vit")
    model.config.num_register_tokens = 2
    new = add_registers(model, 3, std=0.5, seed=2)
    assert new.config.num_register_tokens == 3
    assert torch.equal(_register_tokens(new), torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2)) * 0.5)


def test_registers_kept_in_another_dtype_enter_in_the_activations_dtype():
    """bf16 model, float32 registers (a master copy being trained): the hook casts them to the stream's dtype."""
    model = tiny_model("vit")
    new = add_registers(model, 2, std=0.5).to(torch.bfloat16).eval()
    new.embeddings.register_tokens.data = new.embeddings.register_tokens.data.float()
    out = _out(new, {"pixel_values": torch.randn(2, 3, 28, 28, dtype=torch.bfloat16)})
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 32) and torch.isfinite(out).all()


def test_sharded_save_and_reload(tmp_path):
    import json

    model = tiny_model("vit")
    inputs = tiny_inputs(model)
    new = add_registers(model, 3, std=0.3).eval()
    expected = _out(new, inputs)
    new.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert not (tmp_path / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 1
    plain = transformers.ViTModel.from_pretrained(tmp_path).eval()
    restore_registers(plain, str(tmp_path))
    assert torch.equal(_out(plain, inputs), expected)
    assert torch.equal(zoo.load(str(tmp_path)).model.embeddings.register_tokens, new.embeddings.register_tokens)


@pytest.mark.parametrize("weight_map", [None, {"embeddings.cls_token": "model-00001-of-00002.safetensors"}])
def test_an_index_without_the_registers_is_a_clear_error(tmp_path, weight_map):
    import json

    new = add_registers(tiny_model("vit"), 3)
    new.save_pretrained(tmp_path, max_shard_size="20KB")
    plain = transformers.ViTModel.from_pretrained(tmp_path).eval()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({} if weight_map is None else {"weight_map": weight_map}))
    with pytest.raises(SinklessError, match="announces 3 register tokens but the weights hold no matching 'embeddings.register_tokens'"):
        restore_registers(plain, str(tmp_path))


def test_registers_read_from_a_hub_cache(tmp_path, monkeypatch):
    """A hub id: files come from transformers' cache (``cached_file``), a missing one as None."""
    import transformers.utils

    new = add_registers(tiny_model("vit"), 3, std=0.3).eval()
    new.save_pretrained(tmp_path)
    plain = transformers.ViTModel.from_pretrained(tmp_path).eval()
    asked = []

    def cached_file(source, file, *, _raise_exceptions_for_missing_entries):
        asked.append((source, file, _raise_exceptions_for_missing_entries))
        path = tmp_path / file
        return str(path) if path.exists() else None

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    restore_registers(plain, "someone/tiny-vit-registers")
    assert asked == [("someone/tiny-vit-registers", "model.safetensors.index.json", False),
                     ("someone/tiny-vit-registers", "model.safetensors", False)]
    assert torch.equal(plain.embeddings.register_tokens, new.embeddings.register_tokens)


def test_embeddings_path_is_the_parent_of_a_nested_patch_embedding():
    """Older transformers releases nest CLIP/SigLIP under ``vision_model.``: the embeddings module is the parent."""
    import dataclasses

    from sinkless.registers.add import _embeddings_path

    adapter = adapter_for(tiny_model("clip_vision"))
    assert _embeddings_path(adapter) == "embeddings"
    nested = dataclasses.replace(adapter, patch_embed="vision_model.embeddings.patch_embedding")
    assert _embeddings_path(nested) == "vision_model.embeddings"


def test_hooked_copy_has_its_own_config():
    model = tiny_model("vit")
    new = add_registers(model, 2)
    new.config.id2label[0] = "changed"
    new.config.label2id["changed"] = 0
    assert model.config.id2label[0] == "LABEL_0" and "changed" not in model.config.label2id


@pytest.mark.parametrize("options", [{"add_pooling_layer": False}, {"use_mask_token": True}, {"add_pooling_layer": False, "use_mask_token": True}])
def test_vit_built_with_other_constructor_options(options):
    """A ViTModel without its pooler (``ViTForImageClassification(...).vit``) or with a mask token is rebuilt as it was built."""
    model = transformers.ViTModel(tiny_model("vit").config, **options).eval()
    new = add_registers(model, 2)
    assert (new.pooler is None) == (model.pooler is None)
    assert (new.embeddings.mask_token is None) == (model.embeddings.mask_token is None)
    kept = new.state_dict()
    assert all(torch.equal(kept[name], value) for name, value in model.state_dict().items())
    head = transformers.ViTForImageClassification(tiny_model("vit").config)
    assert add_registers(head.vit, 1).pooler is None


@pytest.mark.parametrize("family", ["vit", "clip_vision", "siglip_vision"])
def test_a_deep_copy_uses_its_own_register_tokens(family):
    import copy

    model = add_registers(tiny_model(family).eval(), 3, std=0.5)
    twin = copy.deepcopy(model)
    inputs = tiny_inputs(model)
    before = _out(twin, inputs)
    with torch.no_grad():
        model.get_submodule(adapter_for(model).patch_embed.rpartition(".")[0]).register_tokens.fill_(100.0)
    assert torch.equal(_out(twin, inputs), before)  # the original's tokens do not reach the copy
    assert not torch.equal(_out(model, inputs), before)
    remove_registers(twin)  # the copy's hook comes off the copy, not the original
    assert not _has_hooks(twin) and _has_hooks(model)


def test_counts_of_numpy_integers_and_beyond_the_patches():
    import numpy as np

    model = tiny_model("vit")
    assert adapter_for(add_registers(model, np.int64(2))).n_registers(add_registers(model, np.int64(2))) == 2
    patches = (model.config.image_size // model.config.patch_size) ** 2
    with pytest.raises(SinklessError, match=f"more tokens than the model's {patches} patches"):
        add_registers(model, patches + 1)


def test_the_per_image_dvt_copy_keeps_added_registers():
    """Stage 1 per image strips the hooks from its copy of the model, but not the hook that inserts the registers."""
    from sinkless.api import as_loaded
    from sinkless.denoise.hook import bare_copy
    from sinkless.registers.add import register_hook_ids

    model = add_registers(tiny_model("vit").eval(), 2, std=0.5)
    assert register_hook_ids(model) and register_hook_ids(tiny_model("vit")) == set()
    inputs = tiny_inputs(model)
    expected = _out(model, inputs)
    model.register_forward_hook(lambda module, args, output: None)  # a caller's hook
    bare = bare_copy(as_loaded(model)).model
    assert torch.equal(_out(bare, inputs), expected)  # the registers still go in
    assert not bare._forward_hooks and model._forward_hooks  # the caller's hook is gone from the copy only
