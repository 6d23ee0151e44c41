"""planted-vit-pos: the position-tied plant (sinkless/planted/positional.py), its ground truth and the zoo entry."""

from __future__ import annotations

import pytest
import torch

from sinkless.errors import SinklessError
from sinkless.planted import tiny_base
from sinkless.planted.positional import PositionalPlant, apply_positional, input_pattern, make_pattern, output_pattern, positional_truth


def test_pattern_is_seeded_and_unit_rms():
    a = make_pattern(PositionalPlant(seed=3), (16, 16), 64)
    b = make_pattern(PositionalPlant(seed=3), (16, 16), 64)
    c = make_pattern(PositionalPlant(seed=4), (16, 16), 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rms = float(a.pow(2).sum(-1).mean().sqrt())
    assert 0.7 < rms < 1.3, rms


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_input_pattern_is_exactly_what_the_embeddings_add(size):
    base, planted = tiny_base(0), apply_positional(tiny_base(0), PositionalPlant(strength=2.0))
    pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        added = planted.embeddings(pixels) - base.embeddings(pixels)  # (1, 1 + h·w, D)
    grid = (size[0] // 8, size[1] // 8)
    truth = input_pattern(planted, grid)
    diff = float((added[0, 1:].reshape(*grid, -1) - truth).abs().max())
    print(f"{size}: input pattern vs embeddings difference, max diff {diff:.2e}; CLS change {float(added[0, 0].abs().max()):.1e}")
    assert diff < 1e-5
    assert float(added[0, 0].abs().max()) == 0.0
    assert truth.norm(dim=-1).mean() > 0


def test_planted_model_saves_and_loads(tmp_path):
    from transformers import Dinov2Model

    planted = apply_positional(tiny_base(0))
    planted.save_pretrained(tmp_path)
    again = Dinov2Model.from_pretrained(tmp_path).eval()
    assert positional_truth(again) == positional_truth(planted)
    for name, tensor in planted.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    with pytest.raises(SinklessError, match="already"):
        apply_positional(again)
    with pytest.raises(SinklessError, match="no positional plant"):
        positional_truth(tiny_base(0))


def test_output_pattern_of_the_tiny_plant():
    from sinkless.adapters import adapter_for
    from sinkless.zoo import Loaded

    def wrap(model, name):
        return Loaded(name, model, adapter_for(model))

    planted, base = wrap(apply_positional(tiny_base(0)), "p"), wrap(tiny_base(0), "b")
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pattern = output_pattern(planted, base, pixels)
    assert pattern.shape == (8, 8, 64) and pattern.norm(dim=-1).mean() > 0


def test_zoo_entry(focus):
    from sinkless import zoo

    loaded = zoo.load("planted-vit-pos")
    assert loaded.name == "planted-vit-pos" and type(loaded.model).__name__ == "Dinov2Model"
    truth = positional_truth(loaded.model)
    assert truth["strength"] == PositionalPlant().strength
    changed = [name for name, t in loaded.model.state_dict().items() if not torch.equal(t, focus.model.state_dict()[name])]
    assert changed == ["embeddings.position_embeddings"]
    assert "planted-vit-pos" in {row["name"] for row in zoo.list_models()}
