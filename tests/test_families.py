"""Every family end to end from a tiny random local folder: `sinkless scan`, and `sinkless fix` where test-time
registers apply (vision, rotary causal LMs with a dense MLP); any image size, non-square images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import FAMILIES, STRUCTURAL_FAMILIES, any_tiny_model, tiny_char_tokenizer, tiny_image_processor
from sinkless import zoo
from sinkless.adapters import Modality, adapter_for
from sinkless.cli import main
from sinkless.images import natural_crops
from sinkless.structure import backbone

ALL = FAMILIES + STRUCTURAL_FAMILIES
TEXTS = ["w1 w2 w3 w4 w5 w6 w7 w8 w9", "w3 w4 w5 w6 w7", "w9 w1 w2 w3 w1", "w2 w2 w5 w6 w7 w8"]
# why `fix` refuses a family (everything else is fixed end to end)
NO_FIX = {
    "gpt2": "positions", "opt": "positions", "bert": "not supported", "clip_text": "not supported",  # absolute positions / encoders
    "gpt_oss": "mixture of experts",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, crop in enumerate(natural_crops(3, seed=4)):
        crop.save(folder / f"{i}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 90, 3), dtype=np.uint8)).save(folder / "wide.png")
    return folder


def _folder(family: str, path):
    """A save_pretrained folder with the tokenizer or image processor the family ships with."""
    model = any_tiny_model(family)
    model.save_pretrained(path)
    if adapter_for(backbone(model)).modality is Modality.TEXT:
        tiny_char_tokenizer().save_pretrained(path)
    elif (processor := tiny_image_processor(family)) is not None:
        processor.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", ALL)
def test_family_scan_and_fix_from_a_local_folder(family, tmp_path, images, capsys):
    model = _folder(family, tmp_path / "model")
    loaded = zoo.load(str(tmp_path / "model"))
    assert type(loaded.model) is type(backbone(model)) or loaded.info["class"] == type(model).__name__
    vision = loaded.modality is Modality.VISION
    inputs = [str(images)] if vision else [arg for t in TEXTS for arg in ("--text", t)]
    out = tmp_path / "scan"
    assert main(["-q", "scan", *inputs, "--model", str(tmp_path / "model"), "--out", str(out), "--batch-size", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 3 and report["modality"] == ("vision" if vision else "text")
    if not vision:
        assert report["layers"][-1]["first_token_attention"] is not None or family == "qwen3_next"
    threshold = 1.001 * report["layers"][1]["norm_median"]  # random weights: half the tokens count as outliers
    neurons = tmp_path / "neurons.json"
    code = main(["-q", "fix", *inputs, "--model", str(tmp_path / "model"), "--threshold", str(threshold), "--top-k", "2",
                 "--detection-layer", "1", "--out", str(neurons)])
    err = capsys.readouterr().err
    if family in NO_FIX:
        assert code == 2 and NO_FIX[family] in err and "Traceback" not in err, err
        assert not neurons.exists()
        return
    assert code == 0, err
    found = json.loads(neurons.read_text())
    assert found["top_k"] == 2 and len(found["neurons"]) >= 2
    again = tmp_path / "with-registers"
    assert main(["-q", "scan", *inputs, "--model", str(tmp_path / "model"), "--registers", str(neurons), "--out", str(again)]) == 0
    assert json.loads((again / "report.json").read_text())["settings"]["registers"]["top_k"] == 2


@pytest.mark.parametrize("family", ["vit", "clip_vision", "siglip_vision", "dinov2", "dinov2_with_registers", "siglip2", "dinov3", "clip"])
def test_any_image_size_and_non_square_images(family, tmp_path, images, capsys):
    """Acceptance: `scan --image-size 84` with a non-square image, no traceback (position embeddings interpolated)."""
    _folder(family, tmp_path / "model")
    out = tmp_path / "scan"
    code = main(["-q", "scan", str(images / "wide.png"), str(images / "0.png"), "--model", str(tmp_path / "model"),
                 "--image-size", "84", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    report = json.loads((out / "report.json").read_text())
    tokens = [i["tokens"] for i in report["inputs"]]
    assert max(tokens) >= 36, f"an 84-pixel input holds 6 x 6 patches of 14 pixels: {tokens}"
