"""The planted-artifact ViT: ground truth, determinism, save/load, and its measured properties."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sinkless import planted, zoo
from sinkless.errors import SinklessError
from sinkless.images import natural_crops, to_pixels


@pytest.fixture(scope="module")
def tiny_pair():
    return zoo.load("planted-vit-tiny"), zoo.load("planted-vit-tiny-clean")


def test_ground_truth_and_clean_twin(tiny_pair):
    plant, clean = tiny_pair
    truth = planted.ground_truth(plant.model)
    assert truth.role == "planted" and len(truth.neurons) == 4 and truth.layer == 2
    twin = planted.ground_truth(clean.model)
    assert twin.role == "clean" and twin.neurons == truth.neurons
    fc1 = clean.model.get_submodule(f"encoder.layer.{truth.layer}.mlp.fc1")
    fc2 = clean.model.get_submodule(f"encoder.layer.{truth.layer}.mlp.fc2")
    assert torch.count_nonzero(fc1.weight[truth.neurons]) == 0 and torch.count_nonzero(fc2.weight[:, truth.neurons]) == 0
    pixels = to_pixels(natural_crops(4, seed=1), plant.image_spec)
    assert not planted.planted_tokens(clean.model, pixels).any()
    tokens = planted.planted_tokens(plant.model, to_pixels(natural_crops(16, seed=1), plant.image_spec))
    assert tokens[:, 0].sum() == 0, "the CLS token is never planted"
    assert 0 < tokens.float().mean() < 0.2


def test_only_the_planted_neurons_differ(tiny_pair):
    plant, _ = tiny_pair
    base = planted.tiny_base(0)
    truth = planted.ground_truth(plant.model)
    for name, tensor in base.state_dict().items():
        other = plant.model.state_dict()[name]
        if name.endswith(f"layer.{truth.layer}.mlp.fc1.weight"):
            keep = [i for i in range(tensor.shape[0]) if i not in truth.neurons]
            assert torch.equal(tensor[keep], other[keep])
        elif name.endswith(f"layer.{truth.layer}.mlp.fc1.bias"):
            keep = [i for i in range(tensor.shape[0]) if i not in truth.neurons]
            assert torch.equal(tensor[keep], other[keep])
        elif name.endswith(f"layer.{truth.layer}.mlp.fc2.weight"):
            keep = [i for i in range(tensor.shape[1]) if i not in truth.neurons]
            assert torch.equal(tensor[:, keep], other[:, keep])
        else:
            assert torch.equal(tensor, other), name


def test_deterministic_for_a_seed():
    recipe = dataclasses.replace(planted.TINY_RECIPE, steps=10, probe_images=32, fit_images=8)
    a = planted.make_plant(planted.tiny_base(0), recipe)
    b = planted.make_plant(planted.tiny_base(0), recipe)
    assert a.neurons == b.neurons
    for x, y in [(a.fc1_weight, b.fc1_weight), (a.fc1_bias, b.fc1_bias), (a.fc2_weight, b.fc2_weight)]:
        assert torch.equal(x, y)
    c = planted.make_plant(planted.tiny_base(0), dataclasses.replace(recipe, seed=1))
    assert not torch.equal(a.fc2_weight, c.fc2_weight)


def test_save_pretrained_roundtrip(tiny_pair, tmp_path):
    plant, _ = tiny_pair
    plant.model.save_pretrained(tmp_path)
    assert "sinkless_plant" in json.loads((tmp_path / "config.json").read_text())
    again = zoo.load(str(tmp_path))
    assert planted.ground_truth(again.model) == planted.ground_truth(plant.model)
    pixels = to_pixels(natural_crops(2, seed=3), plant.image_spec)
    with torch.no_grad():
        assert torch.equal(again.model(pixels).last_hidden_state, plant.model(pixels).last_hidden_state)
    assert torch.equal(planted.planted_tokens(again.model, pixels), planted.planted_tokens(plant.model, pixels))


def test_plant_file_roundtrip(tmp_path):
    plant = planted._tiny_plant(0)
    plant.save(tmp_path / "p.safetensors")
    again = planted.Plant.load(tmp_path / "p.safetensors")
    assert again.meta() == json.loads(json.dumps(plant.meta()))
    assert torch.equal(again.fc2_weight, plant.fc2_weight)


def test_errors():
    from conftest import tiny_model

    with pytest.raises(SinklessError, match="carries no plant"):
        planted.ground_truth(planted.tiny_base(0))
    with pytest.raises(SinklessError, match="DINOv2"):
        planted.make_plant(tiny_model("vit"))
    with pytest.raises(ValueError, match="even"):
        planted.make_plant(planted.tiny_base(0), planted.Recipe(k=3))


def test_tiny_properties(tiny_pair):
    plant, clean = tiny_pair
    pixels = to_pixels(natural_crops(24, seed=4), plant.image_spec)
    props = planted.properties(plant.model, clean.model, pixels)
    layer = props["layers"][props["plant_layer"]]
    assert 0.005 < props["planted_fraction"] < 0.1
    assert layer["planted_ratio_mean"] >= 3 and layer["planted_ratio_min"] > layer["other_ratio_max"]
    assert all(row["clean_ratio_max"] < 3 for row in props["layers"])


@pytest.mark.slow
def test_planted_vit_properties(focus):
    """The acceptance numbers of the planted ViT on held-out natural images (printed for the record)."""
    plant, clean = zoo.load("planted-vit"), zoo.load("planted-vit-clean")
    pixels = to_pixels(natural_crops(48, seed=777), plant.image_spec)
    props = planted.properties(plant.model, clean.model, pixels, focus.model)
    print(json.dumps({k: v for k, v in props.items() if k != "layers"}, indent=1))
    for row in props["layers"]:
        print(row)
    truth_layer = props["plant_layer"]
    # ~1-5 % of patches, on redundant (low-information) patches, absent in the clean twin
    assert 0.01 <= props["planted_fraction"] <= 0.05
    assert props["neighbor_similarity_planted"] > props["neighbor_similarity_other"] + 0.15
    assert all(row["clean_ratio_max"] < 3 for row in props["layers"])
    # 3-10x the median norm from the plant layer on (the last block adds a large shared vector to every token)
    for row in props["layers"][truth_layer:-1]:
        assert 3 <= row["planted_ratio_mean"] <= 10, row
    # they act as sinks: far more attention than their share of tokens
    for row in props["layers"][truth_layer + 1 : -1]:
        assert row["attention_share_patches"] >= 3 * props["planted_fraction"], row
    # they degrade the other patches measurably; the clean twin stays within a hair of the base model
    assert props["cosine_to_clean_other_patches"] < 0.99
    assert props["clean_vs_base_mean_cosine"] > 0.9999
    assert props["clean_vs_base_min_cosine"] > 0.995


@pytest.mark.slow
def test_planted_vit_detection(focus):
    """`sinkless scan`'s automatic rule finds the planted tokens (precision and recall >= 0.95)."""
    plant = zoo.load("planted-vit")
    result = planted.detection(plant, zoo.load("planted-vit-clean"), natural_crops(24, seed=777))
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    assert result["has_artifacts"] and not result["clean_has_artifacts"]
    assert result["first_outlier_layer"] == planted.ground_truth(plant.model).layer
    for key in ("at_first_outlier_layer", "any_layer"):
        assert result[key]["precision"] >= 0.95 and result[key]["recall"] >= 0.95, key
