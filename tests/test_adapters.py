"""Adapters: layout, structure and errors."""

from __future__ import annotations

import pytest

from conftest import FAMILIES, tiny_model
from sinkless.adapters import ADAPTERS, Modality, TokenLayout, adapter_for, supported_architectures
from sinkless.errors import SinklessError


def test_every_family_has_a_fixture():
    assert set(FAMILIES) == set(ADAPTERS)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(SinklessError) as info:
        adapter_for("MambaForCausalLM")
    assert "unsupported architecture 'MambaForCausalLM'" in str(info.value)
    for arch in supported_architectures():
        assert arch in str(info.value)


def test_layouts():
    reg = tiny_model("dinov2_with_registers")
    layout = adapter_for(reg).layout(reg, 1 + 2 + 4, image_hw=(28, 28))
    assert (layout.n_cls, layout.n_registers, layout.grid, layout.n_appended) == (1, 2, (2, 2), 0)
    assert layout.body == slice(3, 7)
    grown = layout.with_appended(1)
    assert grown.body == slice(3, 7) and grown.appended == slice(7, 8)
    sig = tiny_model("siglip_vision")
    assert adapter_for(sig).layout(sig, 4).grid == (2, 2)
    assert adapter_for(sig).layout(sig, 4).n_cls == 0
    text = TokenLayout(5, n_cls=1)
    assert text.body == slice(1, 5)


def test_modalities(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.modality in (Modality.VISION, Modality.TEXT)
    assert adapter.num_layers(model) == 3
    assert adapter.mlp_width(model) in (64, 128)
