"""sinkless scan: measurements, report schema, batching invariance, CLI errors."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from sinkless import planted, zoo
from sinkless.cli import main
from sinkless.images import natural_crops, to_pixels
from sinkless.scan import ImageInput, ScanSettings, TextInput, parse_layers, scan, write_reports
from sinkless.scan.norms import OutlierRule, Rule, thresholds

REQUIRED_LAYER_KEYS = {"layer", "norm_median", "norm_max", "max_ratio", "outlier_fraction", "first_token_attention", "sink_epsilon", "outlier_attention_share"}
REQUIRED_SUMMARY_KEYS = {"has_artifacts", "first_outlier_layer", "outlier_fraction", "max_ratio", "border_fraction", "neighbor_similarity", "sink_share"}


@pytest.fixture(scope="module")
def tiny():
    return zoo.load("planted-vit-tiny"), zoo.load("planted-vit-tiny-clean")


def _images(n, seed=5):
    return [ImageInput(f"crop{i}", im) for i, im in enumerate(natural_crops(n, seed=seed))]


def test_robust_rule_thresholds():
    norms = torch.tensor([[1.0, 1.1, 0.9, 1.0, 5.0, 1.05]])
    tau = thresholds(norms, OutlierRule())
    assert 3.0 <= float(tau) < 5.0
    assert float(thresholds(norms, OutlierRule(absolute=2.0))) == 2.0
    assert float(thresholds(norms, OutlierRule(rule=Rule.MEANSTD))) > 1.0


def test_parse_layers():
    assert parse_layers("all", 12) is None
    assert parse_layers("0-2,11", 12) == (0, 1, 2, 11)
    assert parse_layers("-1", 12) == (11,)
    from sinkless.errors import SinklessError

    with pytest.raises(SinklessError, match="outside"):
        parse_layers("3-40", 12)
    with pytest.raises(SinklessError, match="bad --layers"):
        parse_layers("x", 12)



def test_planted_tiny_outliers_match_ground_truth(tiny):
    planted_model, _ = tiny
    items = _images(24)
    report, records = scan(planted_model, items, ScanSettings(batch_size=8), progress=False)
    truth = planted.ground_truth(planted_model.model)
    pixels = to_pixels([i.image for i in items], planted_model.image_spec)
    gt = planted.planted_tokens(planted_model.model, pixels)  # (B, N)
    li = report.layers[truth.layer]["layer"]
    found = torch.stack([r.outliers[li] for r in records])
    tp = int((found & gt).sum())
    precision, recall = tp / max(int(found.sum()), 1), tp / max(int(gt.sum()), 1)
    print(f"tiny planted: {int(gt.sum())} planted tokens, precision {precision:.3f}, recall {recall:.3f}")
    assert gt.sum() > 0
    assert precision >= 0.95 and recall >= 0.95
    assert report.summary["has_artifacts"] is True
    assert report.summary["first_outlier_layer"] == truth.layer


def test_clean_twin_has_no_artifacts(tiny):
    _, clean = tiny
    report, _ = scan(clean, _images(12), ScanSettings(), progress=False)
    assert report.summary["has_artifacts"] is False
    assert report.outliers == []


def test_batched_equals_one_at_a_time(tiny):
    planted_model, _ = tiny
    items = _images(6, seed=9)
    batched, _ = scan(planted_model, items, ScanSettings(batch_size=6), progress=False)
    single, _ = scan(planted_model, items, ScanSettings(batch_size=1), progress=False)
    a, b = batched.to_dict(), single.to_dict()
    assert [o["token"] for o in a["outliers"]] == [o["token"] for o in b["outliers"]]
    for ra, rb in zip(a["layers"], b["layers"]):
        for key in ("norm_median", "norm_max", "max_ratio", "outlier_fraction", "outlier_attention_share"):
            if ra[key] is None:
                assert rb[key] is None
            else:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key


def test_text_batched_equals_single():
    from conftest import tiny_model
    from tests.test_zoo import _tiny_tokenizer
    from sinkless.adapters import adapter_for

    model = tiny_model("llama")
    loaded = zoo.Loaded("tiny-llama", model, adapter_for(model), tokenizer=_tiny_tokenizer())
    texts = [TextInput("a", " ".join(f"w{i % 60}" for i in range(20))), TextInput("b", "w1 w2 w3 w4 w5 w6 w7")]
    batched, _ = scan(loaded, texts, ScanSettings(batch_size=2), progress=False)
    single, _ = scan(loaded, texts, ScanSettings(batch_size=1), progress=False)
    for ra, rb in zip(batched.layers, single.layers):
        for key in ("norm_median", "first_token_attention", "sink_epsilon"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    assert 0 <= batched.layers[0]["first_token_attention"] <= 1


def test_report_files_and_schema(tiny, tmp_path):
    planted_model, _ = tiny
    items = _images(4)
    report, records = scan(planted_model, items, ScanSettings(), progress=False)
    write_reports(tmp_path / "out", [(report, records, items)])
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"sinkless_version", "model", "modality", "settings", "inputs", "layers", "outliers", "massive_activations", "summary"} <= set(data)
    assert data["modality"] == "vision" and data["model"] == "planted-vit-tiny"
    assert all(REQUIRED_LAYER_KEYS <= set(row) for row in data["layers"])
    assert REQUIRED_SUMMARY_KEYS <= set(data["summary"])
    for outlier in data["outliers"]:
        assert {"input", "layer", "token", "norm", "ratio", "row", "col"} <= set(outlier)
    html = (tmp_path / "out" / "report.html").read_text()
    HTMLParser().feed(html)
    for name in data["figures"]:
        assert (tmp_path / "out" / name).stat().st_size > 1000
        assert name in html


def test_report_renders_in_headless_browser(tiny, tmp_path):
    """The report opened from file:// in a real headless Chromium, alone in its folder (one self-contained file):
    every figure decoded and laid out, the verdicts in words, no console error; a screenshot is kept in tmp_path.

    Skips without a browser, except under CI (SINKLESS_REQUIRE_BROWSER/SINKLESS_REQUIRE_MODELS=1), where it fails.
    """
    from conftest import tiny_model
    from tests.browser import Chromium, require_chromium
    from tests.test_zoo import _tiny_tokenizer
    from sinkless.adapters import adapter_for
    from sinkless.scan.html import verdict

    binary = require_chromium()
    planted_model, _ = tiny
    items = _images(3)
    llama = tiny_model("llama")
    text_model = zoo.Loaded("tiny-llama", llama, adapter_for(llama), tokenizer=_tiny_tokenizer())
    texts = [TextInput("t.txt", " ".join(f"w{i % 60}" for i in range(30)))]
    vision, text = scan(planted_model, items, ScanSettings(), progress=False), scan(text_model, texts, ScanSettings(), progress=False)
    write_reports(tmp_path / "out", [(*vision, items), (*text, texts)])
    alone = tmp_path / "alone"  # the page without its PNG files beside it
    alone.mkdir()
    shutil.copy(tmp_path / "out" / "report.html", alone / "report.html")
    sizes = [Image.open(tmp_path / "out" / name).size for name in vision[0].figures]
    sizes += [Image.open(tmp_path / "out" / "tiny-llama" / name).size for name in text[0].figures]
    with Chromium(binary, width=1200, height=900) as browser:
        for page in (tmp_path / "out" / "report.html", alone / "report.html"):
            browser.open(page.as_uri())
            facts = browser.page_facts()
            images = facts["images"]
            assert [(i["naturalWidth"], i["naturalHeight"]) for i in images] == sizes, page  # every PNG decoded, in order
            broken = [i["alt"] for i in images if not (i["complete"] and i["visible"] and i["shownWidth"] > 0 and i["shownHeight"] > 0)]
            assert not broken, f"images not shown in {page}: {broken}"
            assert {i["scheme"] for i in images} == {"data"}
            assert facts["verdicts"] == [verdict(vision[0].to_dict())[0], verdict(text[0].to_dict())[0]]
            assert facts["verdicts"][0].startswith("Artifacts found: high-norm outlier tokens from layer")
            for caption in vision[0].figure_captions.values():
                assert caption[:60] in facts["text"]
            assert browser.errors() == [], browser.errors()
        shot = browser.screenshot(tmp_path / "report.png")
    print(f"report screenshot: {shot} ({len(images)} figures decoded and shown, verdicts {facts['verdicts']})")
    pixels = Image.open(shot).convert("RGB")
    assert pixels.size == (1200, facts["height"])
    assert len(set(pixels.resize((300, 300)).getdata())) > 200  # text, colour scales and photographs, not a blank page


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.png"], "input not found"),
        (["corrupt.png"], "cannot read"),
        (["notes.txt"], "text file but the model is a vision model"),
        (["--model", "no-such/model", "ok.png"], "unknown model"),
        (["--layers", "99", "ok.png"], "outside"),
    ],
)
def test_cli_bad_inputs_exit_2_without_report(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "notes.txt").write_text("hello")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    if "--model" not in argv:
        argv = ["--model", "planted-vit-tiny", *argv]
    code = main(["scan", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_scan_tiny_end_to_end(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for i, crop in enumerate(natural_crops(3, seed=2)):
        crop.save(images / f"{i}.png")
    assert main(["scan", str(images), "--model", "planted-vit-tiny", "--out", str(tmp_path / "o"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "planted-vit-tiny" in out
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert len(data["inputs"]) == 3 and data["settings"]["batch_size"] == 2
    # -q: the summary still prints, the progress bar does not
    assert main(["-q", "scan", str(images), "--model", "planted-vit-tiny", "--out", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert "planted-vit-tiny" in captured.out and "scanning" not in captured.err
