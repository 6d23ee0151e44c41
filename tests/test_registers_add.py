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
