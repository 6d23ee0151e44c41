"""The scan report as a reader gets it: words, captions, shared colour scales, embedded figures, new JSON fields.

The real-browser test of the page is ``tests/test_scan.py::test_report_renders_in_headless_browser``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sinkless import zoo
from sinkless.images import natural_crops
from sinkless.scan import ImageInput, ScanSettings, TextInput, scan, write_reports
from sinkless.scan import html as report_html
from sinkless.scan import plots, text_plots
from sinkless.scan.norms import OutlierRule


@pytest.fixture(scope="module")
def planted_tiny():
    return zoo.load("planted-vit-tiny")


@pytest.fixture(scope="module")
def tiny_llama():
    from conftest import tiny_model
    from tests.test_zoo import _tiny_tokenizer
    from sinkless.adapters import adapter_for

    model = tiny_model("llama")
    return zoo.Loaded("tiny-llama", model, adapter_for(model), tokenizer=_tiny_tokenizer())


TEXTS = [TextInput("a.txt", " ".join(f"w{i % 60}" for i in range(40))), TextInput("b.txt", "w1 w2 w3 w4 w5 w6 w7 w8 w9")]


def _images(n, seed=5):
    return [ImageInput(f"crop{i}", im) for i, im in enumerate(natural_crops(n, seed=seed))]


# -- hand-made reports: the words ----------------------------------------------------------------------
def _vision_report(**summary) -> dict:
    layers = [{"layer": i, "norm_median": 1.0, "norm_max": 2.0, "max_ratio": 2.0, "max_ratio_worst": 2.5, "outlier_fraction": 0.0,
               "first_token_attention": None, "sink_epsilon": None, "outlier_attention_share": None,
               "outlier_attention_share_cls": None, "outlier_attention_share_patches": None} for i in range(12)]
    base = {"has_artifacts": False, "first_outlier_layer": None, "outlier_layers": [], "peak_layer": None, "outlier_fraction": 0.0,
            "max_ratio": 2.0, "border_fraction": None, "border_fraction_expected": 0.23, "corner_fraction": None,
            "neighbor_similarity": None, "sink_share": None, "sink_share_cls": None, "n_inputs": 2}
    return {
        "sinkless_version": "0", "model": "m", "modality": "vision",
        "settings": {"rule": {"floor": 3.0, "absolute": None, "text": "norm > 3 x median"}, "min_fraction": 0.002, "epsilon": 0.3,
                     "massive_abs": 100.0, "massive_rel": 1000.0, "attention": True, "warmup": 4},
        "inputs": [{"name": "a.png", "tokens": 257, "image_size": [224, 224]}, {"name": "b.png", "tokens": 257, "image_size": [224, 224]}],
        "layers": layers, "outliers": [], "massive_activations": [], "summary": {**base, **summary}, "figures": [], "figure_captions": {},
    }


def test_vision_verdict_in_words():
    report = _vision_report(has_artifacts=True, first_outlier_layer=6, outlier_layers=[6, 7, 8, 9, 10], peak_layer=8, outlier_fraction=0.03,
                            border_fraction=0.5, corner_fraction=0.1, neighbor_similarity={"outliers": 0.7, "others": 0.5},
                            sink_share=0.35, sink_share_cls=0.4)
    report["outliers"] = [{"input": "a.png", "layer": 8, "token": 5, "norm": 8.4, "ratio": 8.4, "row": 0, "col": 4},
                          {"input": "b.png", "layer": 7, "token": 9, "norm": 5.0, "ratio": 5.0, "row": 0, "col": 8}]
    sentence, css = report_html.verdict(report)
    assert sentence == "Artifacts found: high-norm outlier tokens from layers 6 to 10, 3.0 % of patches, up to 8.4× the median norm."
    assert css == "bad"
    rows = dict(report_html.findings(report))
    assert rows["Outlier tokens"].startswith("from layers 6 to 10, 3.0 % of patches, up to 8.4× the median norm")
    assert rows["Where they sit"] == "50 % on the image border (a random patch: 23 %), 10 % in a corner"
    assert "35.0 %" in rows["Attention they draw"] and "40.0 %" in rows["Attention they draw"]


def test_clean_vision_verdict_and_no_raw_keys_outside_the_details():
    report = _vision_report()
    sentence, css = report_html.verdict(report)
    assert sentence == "No artifacts found: every patch stays within 2.50× of its image's median norm."
    assert css == "good"
    page = report_html.render([(report, "")])
    visible = page.split("<details>")[0]
    for key in ("has_artifacts", "first_outlier_layer", "outlier_fraction", "border_fraction_expected", "None", "null"):
        assert key not in visible, key
    assert "has_artifacts" in page.split("<details>")[1]  # the raw summary is still there, folded


def test_nulls_read_not_measured_when_attention_was_off():
    report = _vision_report(has_artifacts=True, first_outlier_layer=6, outlier_layers=[6, 7], peak_layer=6, outlier_fraction=0.01,
                            border_fraction=0.5, corner_fraction=0.0, neighbor_similarity={"outliers": 0.6, "others": 0.5})
    report["outliers"] = [{"input": "a.png", "layer": 6, "token": 5, "norm": 4.0, "ratio": 4.0, "row": 0, "col": 4}]
    report["settings"]["attention"] = False
    assert "not measured" in dict(report_html.findings(report))["Attention they draw"]
    page = report_html.render([(report, "")])
    layer_table = page.split("<h3>Per layer</h3>")[1].split("</table>")[0]
    assert layer_table.count("not measured") == 2 * 12  # both attention columns, every layer
    report["settings"]["attention"] = True  # measured but empty: "does not apply", not "not measured"
    layer_table = report_html.render([(report, "")]).split("<h3>Per layer</h3>")[1].split("</table>")[0]
    assert "not measured" not in layer_table


def test_text_verdict_names_each_finding():
    report = _vision_report(has_artifacts=True, has_first_token_sink=True, first_token_attention_max=0.8, sink_epsilon=0.55,
                            sink_share=0.4, has_massive_activations=True, has_outliers=False,
                            secondary_outliers=[{"text": " the", "count": 14, "layers": [2, 3, 4], "max_ratio": 9.2}])
    report["modality"] = "text"
    report["inputs"] = [{"name": "s.txt", "tokens": 93, "text_tokens": []}]
    report["massive_activations"] = [{"input": "s.txt", "layer": 11, "token": 0, "channel": 507, "value": 24616.0}]
    for row in report["layers"]:
        row["first_token_attention"] = 0.8 if row["layer"] == 24 % 12 else 0.1
    sentence, css = report_html.verdict(report)
    assert sentence == ("Artifacts found: a first-token attention sink (up to 80 % of attention) and "
                        "massive activations (up to 24,616 at token 0).")
    rows = dict(report_html.findings(report))
    assert rows["Massive activations"] == "at token(s) 0 in channel(s) 507, layer 11; largest 24,616 (layer 11, token 0, channel 507)"
    assert rows["Which tokens"] == "' the' 14× (layers 2 to 4, up to 9.2×)"
    assert rows["First-token sink"].startswith("yes: up to 80 % of attention lands on the first token (layer 0)")
    # attention off: no sink verdict pretends it was checked
    report["summary"].update(has_artifacts=False, has_first_token_sink=None, first_token_attention_max=None, sink_epsilon=None,
                             has_massive_activations=False)
    report["settings"]["attention"] = False
    sentence, css = report_html.verdict(report)
    assert css == "unsure" and "not measured" in sentence and "--no-attention" in sentence


def test_html_escapes_token_text():
    report = _vision_report(has_artifacts=True, has_outliers=True, first_token_attention_max=0.1, outlier_layers=[1, 2],
                            secondary_outliers=[{"text": "<script>alert(1)</script>", "count": 2, "layers": [1, 2], "max_ratio": 4.0}])
    report["modality"] = "text"
    report["inputs"] = [{"name": "s.txt", "tokens": 9, "text_tokens": []}]
    report["outliers"] = [{"input": "s.txt", "layer": 1, "token": 3, "norm": 4.0, "ratio": 4.0, "text": "<script>alert(1)</script>"}]
    page = report_html.render([(report, "")])
    assert "<script>" not in page and "&lt;script&gt;" in page


# -- real scans: figures, captions, embedding, JSON fields ----------------------------------------------
def _capture_scales(monkeypatch):
    """Record every figure's colour scales (per image: cmap name and clim) and colorbar labels as it is saved."""
    seen = {}
    original = plots.save

    def spy(fig, folder, name):
        images = [(im.get_cmap().name, tuple(round(float(v), 6) for v in im.get_clim())) for ax in fig.axes for im in ax.images]
        labels = [ax.get_ylabel() for ax in fig.axes]
        seen[name] = {"images": images, "labels": labels}
        return original(fig, folder, name)

    monkeypatch.setattr(plots, "save", spy)
    monkeypatch.setattr(text_plots, "save", spy)
    return seen


def test_vision_norm_maps_share_one_scale_with_colorbar(planted_tiny, tmp_path, monkeypatch):
    seen = _capture_scales(monkeypatch)
    items = _images(6)
    report, records = scan(planted_tiny, items, ScanSettings(), progress=False)
    write_reports(tmp_path / "out", [(report, records, items)])
    assert report.summary["has_artifacts"]
    assert {"artifact_overlay.png", "norms_0.png", "norm_histogram.png", "max_ratio_per_layer.png"} <= set(report.figures)
    floor = report.settings["rule"]["floor"]
    peak = max(o["ratio"] for o in report.outliers)
    overlay = [clim for cmap, clim in seen["artifact_overlay.png"]["images"] if cmap == plots.NORM_CMAP]
    assert len(overlay) == 4 and len(set(overlay)) == 1, overlay  # four panels, one scale
    assert overlay[0][0] == 0 and overlay[0][1] >= floor
    assert overlay[0][1] == pytest.approx(peak, rel=1e-4)  # the top outlier sits at the top of the scale
    assert any("norm / median" in label for label in seen["artifact_overlay.png"]["labels"])  # the colorbar
    for k in range(4):
        strip = [clim for cmap, clim in seen[f"norms_{k}.png"]["images"] if cmap == plots.NORM_CMAP]
        assert len(strip) == len(report.layers) and len(set(strip)) == 1, strip
        assert any("norm / median" in label for label in seen[f"norms_{k}.png"]["labels"])
    # the figures show the inputs with the most outliers at the peak layer, most first
    li = [row["layer"] for row in report.layers].index(report.summary["peak_layer"])
    counts = [int(r.outliers[li].sum()) for r in records]
    shown = [counts[k] for k in plots.ranked(records, li)]
    assert shown == sorted(counts, reverse=True)


def test_every_figure_has_a_caption_is_embedded_and_deterministic(planted_tiny, tiny_llama, tmp_path):
    items = _images(3)
    vision = scan(planted_tiny, items, ScanSettings(), progress=False)
    text = scan(tiny_llama, TEXTS, ScanSettings(batch_size=2), progress=False)
    for out in ("a", "b"):
        write_reports(tmp_path / out, [(*vision, items), (*text, TEXTS)])
    for folder in ("", "tiny-llama"):
        data = json.loads((tmp_path / "a" / folder / "report.json").read_text())
        assert data["figures"] and set(data["figure_captions"]) == set(data["figures"])
        assert all(len(c) > 40 for c in data["figure_captions"].values())
        for name in data["figures"]:  # the PNG files stay beside the report, and are byte-identical run to run
            first, second = (tmp_path / "a" / folder / name).read_bytes(), (tmp_path / "b" / folder / name).read_bytes()
            assert first == second, f"{folder}/{name} differs between two identical scans"
    page = (tmp_path / "a" / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(vision[0].figures) + len(text[0].figures)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    for caption in [*vision[0].figure_captions.values(), *text[0].figure_captions.values()]:
        assert caption.replace("'", "&#x27;") in page
    assert (tmp_path / "a" / "report.html").read_text() == (tmp_path / "b" / "report.html").read_text()
    assert "first_token_attention_heads.png" in text[0].figures and "token_norm_layers_0.png" in text[0].figures


def test_text_report_keeps_per_token_norms_and_alpha0_per_head(tiny_llama, monkeypatch, tmp_path):
    report, records = scan(tiny_llama, TEXTS, ScanSettings(batch_size=2), progress=False)
    data = report.to_dict()
    heads = tiny_llama.model.config.num_attention_heads
    for entry, record in zip(data["inputs"], records):
        norms = np.array(entry["token_norms"])
        assert norms.shape == tuple(record.norms.shape) == (len(report.layers), entry["tokens"])
        np.testing.assert_allclose(norms, record.norms.numpy(), rtol=1e-4)
        np.testing.assert_allclose(entry["token_norm_medians"], record.medians.numpy(), rtol=1e-4)
    alpha = torch.stack([r.alpha0 for r in records])  # (B, L, H)
    for li, row in enumerate(data["layers"]):
        assert len(row["alpha0_per_head"]) == heads
        np.testing.assert_allclose(row["alpha0_per_head"], alpha[:, li].mean(0).numpy(), rtol=1e-4)
        # Sink_eps is the share of (input, head) above eps of the same alpha0
        assert row["sink_epsilon"] == pytest.approx(float((alpha[:, li] > report.settings["epsilon"]).float().mean()))
    # the existing fields keep their names
    assert {"name", "tokens", "text_tokens"} <= set(data["inputs"][0])
    # heatmap drawn on one 0..1 scale
    seen = _capture_scales(monkeypatch)
    write_reports(tmp_path / "o", [(report, records, TEXTS)])
    assert seen["first_token_attention_heads.png"]["images"] == [("viridis", (0.0, 1.0))]
    strips = {seen[f"token_norms_{k}.png"]["labels"][-1] for k in range(len(TEXTS))}
    assert strips == {"norm / median"}  # each strip has its colorbar


def test_no_attention_text_report_has_null_alpha0(tiny_llama):
    report, _ = scan(tiny_llama, TEXTS[:1], ScanSettings(attention=False), progress=False)
    assert all(row["alpha0_per_head"] is None for row in report.layers)
    assert len(report.to_dict()["inputs"][0]["token_norms"]) == len(report.layers)


# -- the browser test's own rule: skip on a laptop, fail in CI -------------------------------------------
@pytest.mark.parametrize("env, outcome", [({}, pytest.skip.Exception), ({"SINKLESS_REQUIRE_BROWSER": "1"}, pytest.fail.Exception),
                                          ({"SINKLESS_REQUIRE_MODELS": "1"}, pytest.fail.Exception)])
def test_missing_browser_skips_only_outside_ci(env, outcome, monkeypatch):
    from tests import browser

    for flag in ("SINKLESS_REQUIRE_BROWSER", "SINKLESS_REQUIRE_MODELS"):
        monkeypatch.delenv(flag, raising=False)
    for flag, value in env.items():
        monkeypatch.setenv(flag, value)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    with pytest.raises(outcome, match="apt-get install -y chromium-headless-shell"):
        browser.require_chromium()


# -- what the figures draw (read back from their artists; tests/figure_facts.py) -------------------------
@pytest.fixture
def drawn(monkeypatch):
    """{PNG name: facts of the figure} for every figure saved while the test runs."""
    from figure_facts import facts

    seen = {}
    original = plots.save

    def spy(fig, folder, name):
        seen[name] = facts(fig)
        return original(fig, folder, name)

    monkeypatch.setattr(plots, "save", spy)
    monkeypatch.setattr(text_plots, "save", spy)
    return seen


def _text_records():
    from tests.test_report import text_record

    a = text_record(6, "dir/a-rather-long-file-name.txt", outliers_at={1: {3: 6.0}, 2: {3: 6.0}},
                    first_token=torch.tensor([0.1, 0.5, 0.9]), alpha0=torch.tensor([[0.1, 0.2], [0.5, 0.6], [0.9, 0.95]]),
                    tokens=["<s>", "x\ny", "$a$", "b", "c", "d"])
    a.norms[:, 0] = 20.0  # the first-token sink: 20x the median
    a.massive = [{"layer": 1, "token": 0, "channel": 5, "value": -500.0}, {"layer": 2, "token": 0, "channel": 5, "value": 800.0},
                 {"layer": 2, "token": 0, "channel": 9, "value": 300.0}]
    others = []
    for k in range(8):
        r = text_record(6, f"t{k}.txt", first_token=torch.tensor([0.2, 0.4, 0.6]), alpha0=torch.tensor([[0.0, 0.1], [0.2, 0.3], [0.4, 0.5]]))
        r.norms[:, 0] = 5.0
        r.norms[:, 2] = 2.0 + 0.1 * k  # the later inputs have a larger (non-outlier) ratio
        others.append(r)
    return [a, *others]


def test_text_figures_draw_what_their_captions_say(drawn, tmp_path):
    from matplotlib import colormaps

    from tests.test_report import text_report

    records = _text_records()
    report = text_report(records).to_dict()
    figures = text_plots.text_figures(records, report, tmp_path)
    assert [f.name for f in figures] == [
        "first_token_attention.png", "first_token_attention_heads.png", "massive_activations.png",
        "token_norm_layers_0.png", "token_norm_layers_1.png", *[f"token_norms_{k}.png" for k in range(4)]]
    captions = {f.name: f.caption for f in figures}
    assert all((tmp_path / f.name).is_file() for f in figures)

    # first-token attention: one thin line per input (at most 8), the thick black mean, the 30 % sink level
    ax = drawn["first_token_attention.png"]["axes"][0]
    assert [line["label"] for line in ax["lines"]] == ["a-rather-long-file-n", *[f"t{k}.txt" for k in range(7)], "mean", "sink level 0.3"]
    assert ax["legend"] == [line["label"] for line in ax["lines"]]
    np.testing.assert_allclose(ax["lines"][0]["x"], [0, 1, 2])
    np.testing.assert_allclose(ax["lines"][0]["y"], [0.1, 0.5, 0.9])
    mean = ax["lines"][-2]
    np.testing.assert_allclose(mean["y"], [(0.1 + 8 * 0.2) / 9, (0.5 + 8 * 0.4) / 9, (0.9 + 8 * 0.6) / 9], atol=1e-4)
    assert mean["color"] == "#000000ff" and mean["width"] == 2.0 and all(line["width"] < 2.0 for line in ax["lines"][:-2])
    level = ax["lines"][-1]
    assert level["y"].tolist() == [0.3, 0.3] and level["color"] == "#dc143cff" and level["style"] == "--"
    assert ax["ylim"] == (0.0, 1.0) and all(float(p).is_integer() for p in ax["xtick_pos"])
    assert (ax["title"], ax["xlabel"], ax["ylabel"]) == ("first-token attention share", "layer", "attention on the first token")
    assert captions["first_token_attention.png"] == (
        "Share of attention that lands on the first token, per layer: mean over heads and over queries from position 4 on "
        "(Xiao et al. 2024). Thin lines: single inputs (at most 8); thick: the mean. A sink takes a large share (here flagged "
        "from 30 %) in most layers.")

    # alpha0 per head: heads x layers on one 0..1 scale, white dots on the heads above eps
    heads, bar = drawn["first_token_attention_heads.png"]["axes"]
    expected = ((torch.tensor([[0.1, 0.2], [0.5, 0.6], [0.9, 0.95]]) + 8 * torch.tensor([[0.0, 0.1], [0.2, 0.3], [0.4, 0.5]])) / 9).T
    image = heads["images"][0]
    np.testing.assert_allclose(image["data"], expected.numpy(), atol=1e-4)  # report.json keeps 5 digits
    assert (image["cmap"], image["clim"]) == ("viridis", (0.0, 1.0))
    above = sorted(map(tuple, heads["points"][0].tolist()))
    assert above == sorted((float(l), float(h)) for h in range(2) for l in range(3) if expected[h, l] > 0.3)
    assert heads["xticks"] == ["0", "1", "2"] and (heads["xlabel"], heads["ylabel"]) == ("layer", "head")
    share = sum(1 for h in range(2) for l in range(3) if expected[h, l] > 0.3) / 6
    assert heads["title"] == f"alpha0 per head: {100 * share:.0f} % of (layer, head) above eps = 0.3"
    assert bar["ylabel"] == "alpha0: mean attention\non the first token" and bar["lines"][0]["y"].tolist() == [0.3, 0.3]
    assert bar["lines"][0]["color"] == "#ffffffff" and bar["lines"][0]["style"] == "--"
    assert captions["first_token_attention_heads.png"] == (
        "alpha0 per head and layer: the attention every later query gives the first token, mean over queries and inputs "
        f"(Gu et al. 2025). One colour scale, 0 to 1; white dots: heads above eps = 0.3, the ones Sink_eps counts "
        f"({100 * share:.0f} % here). Sink heads form bands from the layer where the sink emerges.")

    # massive activations: the largest |value| first, labelled by layer, token and channel, on a log axis
    ax = drawn["massive_activations.png"]["axes"][0]
    assert [b["size"][1] for b in ax["boxes"]] == [800.0, 500.0, 300.0]
    assert ax["xticks"] == ["L2 t0 c5", "L1 t0 c5", "L2 t0 c9"] and ax["yscale"] == "log" and ax["ylabel"] == "|activation|"
    assert ax["title"] == "largest massive activations (layer, token, channel)"
    assert captions["massive_activations.png"] == (
        "The 3 largest massive activations (Sun et al. 2024): single residual-stream entries with |a| > 100 and > 1000x "
        "the layer's median |a|, labelled by layer (L), token position (t) and channel (c). They sit on a few tokens and a "
        "few fixed channels.")

    # layer x token maps of the two inputs with the most outliers: norm / median on a log scale, tokens as labels
    ax, bar = drawn["token_norm_layers_0.png"]["axes"]
    image = ax["images"][0]
    np.testing.assert_allclose(image["data"], (records[0].norms / records[0].medians[:, None]).numpy())
    assert (image["cmap"], image["norm"], image["clim"]) == ("magma", "LogNorm", (1.0, 20.0))
    assert ax["xticks"] == ["<s>", "x\\ny", "\\$a\\$", "b", "c", "d"] and ax["yticks"] == ["0", "1", "2"]
    assert (ax["title"], ax["xlabel"], ax["ylabel"]) == ("token norm per layer: a-rather-long-file-name.txt", "token", "layer")
    assert bar["yticks"] == ["1", "2", "3", "5", "10", "20"] and bar["ylabel"] == "norm / median\n(log scale)"
    assert drawn["token_norm_layers_1.png"]["axes"][0]["images"][0]["clim"] == (1.0, 10.0)  # at least a decade
    assert captions["token_norm_layers_0.png"] == (
        "a-rather-long-file-name.txt: the residual-stream norm of every token (columns) at every scanned layer (rows), divided "
        "by the median norm of the input's tokens after the first at that layer; one log colour scale (1x to 20x). A "
        "first-token sink is a bright first column from the layer where it forms; secondary outliers are isolated bright cells.")

    # token strips at the peak layer: one colour scale for all (0 to the largest ratio after token 0), the sink clipped
    ax, bar = drawn["token_norms_0.png"]["axes"]
    cmap = colormaps["magma_r"]
    ratios = [20.0, 1.0, 1.0, 6.0, 1.0, 1.0]
    assert [b["face"] for b in ax["boxes"]] == [to_hex_alpha(cmap(min(r, 6.0) / 6.0)) for r in ratios]
    assert [b["edge"] for b in ax["boxes"]] == ["#dc143cff"] + ["#00000000"] * 5  # the clipped sink is framed
    assert [t["text"] for t in ax["texts"]] == ["<s> 20x", "x\\ny", "\\$a\\$", "b", "c", "d"]
    assert [t["color"] for t in ax["texts"]] == ["#ffffffff", "#000000ff", "#000000ff", "#ffffffff", "#000000ff", "#000000ff"]
    assert ax["title"] == "a-rather-long-file-name.txt: token norm / median at layer 1"
    assert bar["ylim"] == (0.0, 6.0) and bar["ylabel"] == "norm / median" and bar["lines"][0]["y"].tolist() == [3.0, 3.0]
    assert [drawn[f"token_norms_{k}.png"]["axes"][1]["ylim"] for k in range(4)] == [(0.0, 6.0)] * 4  # shared by every strip
    assert captions["token_norms_0.png"] == (
        "a-rather-long-file-name.txt: each token coloured by its norm / the median token norm at layer 1 (the peak outlier "
        "layer), one colour scale for every strip (0 to 6.0x); tokens beyond it (the first-token sink) are clipped and show "
        "their ratio.")
    shown = [drawn[f"token_norms_{k}.png"]["axes"][0]["title"].split(":")[0] for k in range(1, 4)]
    assert shown == ["t7.txt", "t6.txt", "t5.txt"]  # then the inputs with the largest ratio


def to_hex_alpha(color) -> str:
    from matplotlib.colors import to_hex

    return to_hex(color, keep_alpha=True)


def test_text_figures_without_attention_outliers_or_a_floor(drawn, tmp_path):
    from tests.test_report import text_record, text_report

    records = [text_record(200, "long.txt"), text_record(6, "short.txt")]
    records[0].norms[:, 0] = 4.0
    records[0].norms[1, 7] = 2.5  # the largest ratio (no outlier): layer 1
    report = text_report(records, rule=OutlierRule(absolute=50.0)).to_dict()
    figures = text_plots.text_figures(records, report, tmp_path)
    assert [f.name for f in figures] == ["token_norm_layers_0.png", "token_norm_layers_1.png", "token_norms_0.png", "token_norms_1.png"]
    strip = figures[2]
    assert strip.caption.startswith("long.txt (first 160 of 200 tokens): each token coloured by its norm / the median token "
                                    "norm at layer 1 (the layer with the largest norm ratio), one colour scale for every strip (0 to 3.0x)")
    ax, bar = drawn["token_norms_0.png"]["axes"]
    assert len(ax["boxes"]) == 160 and bar["lines"] == []  # an absolute threshold: no floor line on the scale
    assert ax["ylim"] == (0.0, 10.0)  # 160 tokens, 16 a row
    labels = drawn["token_norm_layers_0.png"]["axes"][0]["xticks"]
    assert labels[:3] == ["t0", "t2", "t4"] and drawn["token_norm_layers_0.png"]["axes"][0]["xlabel"] == "token (one label every 2 tokens)"


# -- the text figures' layout and styles: sizes, margins, fonts, markers, scales (read back, hand-made inputs) --------
def _inches(margins):
    return tuple(round(v, 6) for v in margins)


def test_first_token_figure_layout_and_line_styles(drawn, tmp_path):
    from tests.test_report import text_record, text_report

    records = [text_record(5, f"dir/in{k}.txt", layers=(3, 5, 7), first_token=torch.tensor([0.2, 0.4, 0.6]) + 0.1 * k)
               for k in range(2)]
    report = text_report(records).to_dict()
    text_plots._first_token(records, report, tmp_path)
    fig = drawn["first_token_attention.png"]
    ax = fig["axes"][0]
    assert fig["size"] == (5.5, 3.0) and ax["margins"] == _inches((0.7, 0.15, 0.35, 0.5))
    assert [line["label"] for line in ax["lines"]] == ["in0.txt", "in1.txt", "mean", "sink level 0.3"]
    for line in ax["lines"][:3]:  # the inputs and the mean are drawn at the scanned layers' numbers, not at 0, 1, 2
        assert line["x"].tolist() == [3.0, 5.0, 7.0]
    assert ax["line_style"][:2] == [{"marker": ".", "alpha": 0.6}] * 2  # thin, dotted, translucent inputs
    assert ax["lines"][2]["width"] == 2.0 and ax["lines"][3]["width"] == 1.0  # the thick mean, the thin sink level
    assert ax["title_size"] == 9.0 and ax["legend_sizes"] == [6.0]


def _alpha0_report(alpha, eps=0.3, first_layer=10):
    """A report with alpha0 per head: ``alpha`` is L lists of H values (None: not finite)."""
    return {"layers": [{"layer": first_layer + i, "alpha0_per_head": row} for i, row in enumerate(alpha)],
            "settings": {"epsilon": eps}}


def test_alpha0_heads_figure_size_ticks_dots_and_scale(drawn, tmp_path):
    import matplotlib
    from matplotlib.markers import MarkerStyle

    # 17 layers x 6 heads: values on the eps line are not above it; a head measured nowhere (None) stays a gap
    alpha = [[0.9 if (h + i) % 3 == 0 else 0.3 if (h + i) % 3 == 1 else 0.1 for h in range(6)] for i in range(17)]
    alpha[4][2] = None
    with matplotlib.rc_context({"image.cmap": "gray", "scatter.marker": "x"}):  # a user's style changes none of it
        figure = text_plots._alpha0_heads(_alpha0_report(alpha), tmp_path)
    fig = drawn["first_token_attention_heads.png"]
    heads, bar = fig["axes"]
    assert fig["size"] == (round(2.2 + 0.28 * 17, 6), round(1.2 + 0.22 * 6, 6))
    assert heads["margins"] == _inches((0.55, 1.1, 0.35, 0.5))
    values = np.array([[np.nan if v is None else v for v in row] for row in alpha]).T
    np.testing.assert_array_equal(heads["images"][0]["data"], values)
    assert (heads["images"][0]["cmap"], heads["images"][0]["clim"]) == ("viridis", (0.0, 1.0))
    assert heads["aspect"] == "auto" and heads["interpolation"] == ["nearest"]
    above = [(float(i), float(h)) for h in range(6) for i in range(17) if alpha[i][h] == 0.9]
    assert sorted(map(tuple, heads["points"][0].tolist())) == sorted(above)
    dots = heads["scatter"][0]
    assert (dots["sizes"], dots["face"], dots["widths"], dots["label"]) == ([4.0], ["#ffffffff"], [0.0], "alpha0 > 0.3")
    circle = MarkerStyle("o")
    np.testing.assert_allclose(dots["marker"], circle.get_path().transformed(circle.get_transform()).vertices)
    assert heads["xtick_pos"] == [float(i) for i in range(0, 17, 2)] and heads["xticks"] == [str(10 + i) for i in range(0, 17, 2)]
    assert heads["ytick_pos"] == [float(h) for h in range(6)]
    assert heads["xtick_style"] == [(7.0, 0.0)] and heads["ytick_style"] == [(7.0, 0.0)]
    share = len(above) / (17 * 6)
    assert heads["title"] == f"alpha0 per head: {100 * share:.0f} % of (layer, head) above eps = 0.3" and heads["title_size"] == 9.0
    assert f"({100 * share:.0f} % here)" in figure.caption
    assert bar["colorbar"] == {"cmap": "viridis", "norm": "Normalize", "range": (0.0, 1.0)}
    assert bar["lines"][0]["y"].tolist() == [0.3, 0.3] and bar["lines"][0]["width"] == 1.2

    # 40 layers x 25 heads, every head a sink: the figure stops growing, ticks thin out, 100 %
    figure = text_plots._alpha0_heads(_alpha0_report([[0.9] * 25] * 40, first_layer=0), tmp_path)
    fig = drawn["first_token_attention_heads.png"]
    heads = fig["axes"][0]
    assert fig["size"] == (11.0, 6.0)
    assert heads["xtick_pos"] == [float(i) for i in range(0, 40, 3)] and heads["xticks"] == [str(i) for i in range(0, 40, 3)]
    assert heads["ytick_pos"] == [float(h) for h in range(0, 25, 3)]
    assert heads["title"] == "alpha0 per head: 100 % of (layer, head) above eps = 0.3" and "(100 % here)" in figure.caption

    # 3 layers x 2 heads: the smallest figure, a tick on every head
    text_plots._alpha0_heads(_alpha0_report([[0.1, 0.5]] * 3), tmp_path)
    fig = drawn["first_token_attention_heads.png"]
    assert fig["size"] == (6.0, 2.4) and fig["axes"][0]["ytick_pos"] == [0.0, 1.0]


def test_massive_figure_shows_the_20_largest_as_orange_bars(drawn, tmp_path):
    massive = [{"layer": k % 3, "token": k, "channel": 7, "value": (-1) ** k * (100.0 + 10 * k)} for k in range(25)]
    report = {"massive_activations": massive, "settings": {"massive_abs": 100.0, "massive_rel": 1000.0}}
    figure = text_plots._massive(report, tmp_path)
    fig = drawn["massive_activations.png"]
    ax = fig["axes"][0]
    assert fig["size"] == (6.0, 3.4) and ax["margins"] == _inches((0.8, 0.15, 0.35, 1.0))
    assert [b["size"][1] for b in ax["boxes"]] == [100.0 + 10 * k for k in range(24, 4, -1)]
    assert {b["face"] for b in ax["boxes"]} == {"#ff8c00ff"}
    assert ax["xticks"] == [f"L{k % 3} t{k} c7" for k in range(24, 4, -1)] and ax["xtick_style"] == [(6.0, 70.0)]
    assert ax["title_size"] == 9.0 and figure.caption.startswith("The 20 largest massive activations")


def test_norm_map_size_ticks_and_log_scale(drawn, tmp_path):
    from tests.test_report import text_record

    # 34 layers x 101 tokens, no token texts, medians 2: ratios from 0.05 to 20000 (the scale starts at 0.1);
    # a layer whose median is 0 gives infinite ratios, left out of the scale
    r = text_record(101, "dir/big.txt", layers=tuple(range(100, 134)))
    r.tokens = None
    r.medians = torch.full((34,), 2.0)
    r.norms[5, 7] = 0.1
    r.norms[6, 8] = 40000.0
    r.medians[9] = 0.0
    text_plots._norm_map(r, tmp_path, "big.png")
    fig = drawn["big.png"]
    ax, bar = fig["axes"]
    assert fig["size"] == (13.0, 6.4) and ax["margins"] == _inches((0.5, 1.1, 0.35, 1.0))
    np.testing.assert_allclose(ax["images"][0]["data"], (r.norms / r.medians[:, None]).numpy())
    assert ax["images"][0]["clim"] == (0.1, 20000.0) and ax["images"][0]["norm"] == "LogNorm"
    assert ax["aspect"] == "auto" and ax["interpolation"] == ["nearest"]
    assert ax["xtick_pos"] == [float(i) for i in range(0, 101, 2)] and ax["xticks"] == [str(i) for i in range(0, 101, 2)]
    assert ax["xlabel"] == "token (one label every 2 tokens)" and ax["xtick_style"] == [(6.0, 90.0)]
    assert ax["ytick_pos"] == [float(i) for i in range(0, 34, 3)] and ax["yticks"] == [str(100 + i) for i in range(0, 34, 3)]
    assert ax["ytick_style"] == [(7.0, 0.0)] and ax["title_size"] == 9.0
    assert bar["colorbar"] == {"cmap": "magma", "norm": "LogNorm", "range": (0.1, 20000.0)}
    assert bar["yticks"] == ["0.1", "0.2", "0.5", "1", "2", "3", "5", "10", "20", "50", "100", "200", "500", "1000", "2000",
                             "5000", "10000"]

    # 3 layers x 6 tokens with a zero norm (not on a log scale): the scale starts at the smallest positive ratio
    r = text_record(6, "small.txt", tokens=["<s>", "abcdefghijk", "b", "c", "d", "e"])
    r.norms[1, 2] = 0.0
    r.norms[:, 3] = 0.5
    text_plots._norm_map(r, tmp_path, "small.png")
    fig = drawn["small.png"]
    ax, bar = fig["axes"]
    assert fig["size"] == (round(3 + 0.13 * 6, 6), round(1.9 + 0.16 * 3, 6))
    assert ax["images"][0]["clim"] == (0.5, 5.0) and ax["xticks"][1] == "abcdefgh" and ax["xlabel"] == "token"
    assert bar["yticks"] == ["0.5", "1", "2", "3", "5"]

    # one token: no body median, nothing finite; a default scale of 0.5 to 5
    r = text_record(1, "one.txt", tokens=["<s>"])
    r.medians = torch.full((3,), float("nan"))
    figure = text_plots._norm_map(r, tmp_path, "one.png")
    assert drawn["one.png"]["axes"][0]["images"][0]["clim"] == (0.5, 5.0) and "(0.5x to 5x)" in figure.caption


def test_token_strip_boxes_labels_and_scale(drawn, tmp_path):
    from matplotlib import colormaps

    from tests.test_report import text_record

    # 20 tokens without texts (two rows of 16), medians 2, a shared scale of 0 to 5: the sink (10x) is clipped;
    # 3x is exactly 0.6 of the scale (black text), 4x above it (white text)
    r = text_record(20, "dir/strip.txt", layers=(4, 5, 6))
    r.tokens = None
    r.medians = torch.full((3,), 2.0)
    r.norms[1] = 2.0
    r.norms[1, 0], r.norms[1, 3], r.norms[1, 17] = 20.0, 6.0, 8.0
    report = {"settings": {"rule": {"absolute": None, "floor": 3.0}}}
    figure = text_plots._token_strip(r, 1, 5.0, "why", report, tmp_path, "strip.png")
    assert figure.name == "strip.png" and (tmp_path / "strip.png").is_file()
    fig = drawn["strip.png"]
    ax, bar = fig["axes"]
    assert fig["size"] == (10.5, round(0.45 * 2 + 0.6, 6)) and ax["margins"] == _inches((0.05, 0.9, 0.35, 0.05))
    places = [(float(i % 16), float(1 - i // 16)) for i in range(20)]
    assert [b["xy"] for b in ax["boxes"]] == places and {b["size"] for b in ax["boxes"]} == {(0.95, 0.85)}
    assert ax["box_widths"] == [1.5] * 20
    ratios = [10.0, 1.0, 1.0, 3.0] + [1.0] * 13 + [4.0, 1.0, 1.0]
    cmap = colormaps["magma_r"]
    assert [b["face"] for b in ax["boxes"]] == [to_hex_alpha(cmap(min(v, 5.0) / 5.0)) for v in ratios]
    assert [t["text"] for t in ax["texts"]] == ["0 10x", *[str(i) for i in range(1, 20)]]
    assert [t["color"] for t in ax["texts"]] == ["#ffffffff"] + ["#000000ff"] * 16 + ["#ffffffff", "#000000ff", "#000000ff"]
    assert [t["xy"] for t in ax["text_style"]] == [(x + 0.47, y + 0.42) for x, y in places]
    assert {(t["ha"], t["va"], t["size"]) for t in ax["text_style"]} == {("center", "center", 6.0)}
    assert (ax["xlim"], ax["ylim"], ax["axis_on"]) == ((0.0, 16.0), (0.0, 2.0), False)
    assert bar["colorbar"] == {"cmap": "magma_r", "norm": "Normalize", "range": (0.0, 5.0)} and bar["ylabel"] == "norm / median"
    assert bar["lines"][0]["y"].tolist() == [3.0, 3.0]
    assert ax["title"] == "strip.txt: token norm / median at layer 5" and ax["title_size"] == 8.0
    assert figure.caption.startswith("strip.txt: each token coloured by its norm / the median token norm at layer 5 (why)")

    # long token texts: 9 characters in a box, 5 beside the ratio of a clipped one
    r = text_record(3, "long.txt", tokens=["0123456789ab", "abcdefghijkl", "$x$"])
    r.norms[1, 0] = 10.0
    text_plots._token_strip(r, 1, 5.0, "why", report, tmp_path, "long.png")
    assert [t["text"] for t in drawn["long.png"]["axes"][0]["texts"]] == ["01234 10x", "abcdefghi", "\\$x\\$"]


def test_text_figures_of_one_layer_scale_strips_from_token_1(drawn, tmp_path):
    from tests.test_report import text_record, text_report

    # a single scanned layer, medians 2: token 1 holds the largest ratio after the sink (5x), the top of every strip
    records = [text_record(6, f"{k}.txt", layers=(0,), first_token=torch.tensor([0.5]), alpha0=torch.tensor([[0.4, 0.6]]))
               for k in range(2)]
    for r in records:
        r.medians = torch.full((1,), 2.0)
        r.norms[0] = 2.0
        r.norms[0, 0] = 40.0
    records[0].norms[0, 1] = 10.0
    report = text_report(records).to_dict()
    figures = text_plots.text_figures(records, report, tmp_path)
    assert [f.name for f in figures] == ["first_token_attention.png", "first_token_attention_heads.png", "token_norm_layers_0.png",
                                         "token_norm_layers_1.png", "token_norms_0.png", "token_norms_1.png"]
    assert [drawn[f"token_norms_{k}.png"]["axes"][1]["ylim"] for k in range(2)] == [(0.0, 5.0)] * 2
    assert [t["text"] for t in drawn["token_norms_0.png"]["axes"][0]["texts"]][:2] == ["t0 20x", "t1"]


def _vision_inputs(n=5, layers=tuple(range(14))):
    from PIL import Image

    from tests.test_report import vision_record

    records = []
    for k in range(n):
        out = {li: {5: 9.0 + k} for li in range(6, len(layers))} if 0 < k < 3 else {}
        if k == 0:
            out = {li: {5: 9.0, 6: 12.0} for li in range(6, len(layers))}
        records.append(vision_record(f"dir/{k}-input-with-a-long-name.png", outliers_at=out, layers=layers,
                                     cls_attention=torch.linspace(0, 1, 17) * (k + 1)))
    inputs = [ImageInput(r.name, Image.new("RGB", (40, 30), (40 * k, 20, 30))) for k, r in enumerate(records)]
    return records, inputs


def test_vision_figures_draw_what_their_captions_say(drawn, tmp_path):
    from PIL import Image

    from tests.test_report import vision_report

    records, inputs = _vision_inputs()
    report = vision_report(records).to_dict()
    figures = plots.vision_figures(records, inputs, report, tmp_path)
    assert [f.name for f in figures] == ["artifact_overlay.png", *[f"norms_{k}.png" for k in range(4)], "norm_histogram.png",
                                         "max_ratio_per_layer.png"]
    captions = {f.name: f.caption for f in figures}
    order = [0, 2, 1, 3]  # most outliers at the peak layer first, then the largest ratio; at most 4

    # the signature picture: inputs with their outliers boxed, norm maps on one scale, CLS attention on one scale
    fig = drawn["artifact_overlay.png"]
    assert fig["suptitle"] == "high-norm tokens at layer 6, the peak outlier layer"
    pictures, maps, attention, norm_bar, attention_bar = fig["axes"][0:4], fig["axes"][4:8], fig["axes"][8:12], fig["axes"][12], fig["axes"][13]
    counts = ["2 outlier patches", "1 outlier patch", "1 outlier patch", "0 outlier patches"]
    assert [ax["title"] for ax in pictures] == [f"{k}-input-with-a-long-n…\n{c}" for k, c in zip(order, counts)]
    assert [ax["title_color"] for ax in pictures] == ["#dc143cff"] * 3 + ["#000000ff"]
    for ax, k in zip(pictures, order):
        np.testing.assert_array_equal(ax["images"][0]["data"], np.asarray(inputs[k].image.resize((56, 56), Image.BICUBIC)))
    assert [(b["xy"], b["size"], b["edge"], b["fill"]) for b in pictures[0]["boxes"]] == [
        ((0.0, 14.0), (14.0, 14.0), "#00ffffff", False), ((14.0, 14.0), (14.0, 14.0), "#00ffffff", False)]  # patches 4 and 5
    for ax, k in zip(maps, order):
        r = records[k]
        np.testing.assert_allclose(ax["images"][0]["data"], (r.norms[6][1:] / r.medians[6]).reshape(4, 4).numpy())
        assert (ax["images"][0]["cmap"], ax["images"][0]["clim"]) == (plots.NORM_CMAP, (0.0, 12.0))
    for ax, k in zip(attention, order):
        np.testing.assert_allclose(ax["images"][0]["data"], records[k].cls_attention[1:].reshape(4, 4).numpy())
        assert (ax["images"][0]["cmap"], ax["images"][0]["clim"]) == ("viridis", (0.0625, 4.0))
    assert [pictures[0]["ylabel"], maps[0]["ylabel"], attention[0]["ylabel"]] == ["input,\noutliers boxed", "token norm\nlayer 6",
                                                                                   "CLS attention\nlayer 13"]
    assert norm_bar["ylabel"] == plots.RATIO_LABEL and norm_bar["lines"][0]["y"].tolist() == [3.0, 3.0]
    assert (norm_bar["lines"][0]["color"], norm_bar["lines"][0]["style"]) == ("#00ffffff", "--")
    assert attention_bar["ylabel"] == "CLS attention\n(mean over heads)" and attention_bar["lines"] == []
    assert captions["artifact_overlay.png"] == (
        "The artifact picture (Darcet et al. 2024, Fig. 1-2) for the 4 input(s) with the most outlier tokens at layer 6, the "
        "peak outlier layer. Top: the input as the model sees it, with its outlier patches (4 in all) boxed in cyan. Middle: "
        "each patch's token norm divided by the median patch norm of that image, one colour scale for all panels (0 to 12.0x; "
        "dashed line on the colorbar: the 3x outlier floor). Bottom: the attention CLS gives each patch at the last scanned "
        "layer (13), mean over heads, one scale (0.062 to 4); artifact patches draw spikes of it.")

    # per-input norm maps: 12 of the 14 layers, evenly spaced, one scale per input
    fig = drawn["norms_0.png"]
    assert fig["suptitle"] == "token norm per layer: 0-input-with-a-long-name.png"
    shown = [0, 1, 2, 4, 5, 6, 7, 8, 9, 11, 12, 13]
    panels, bar = fig["axes"][1:13], fig["axes"][13]
    assert fig["axes"][0]["title"] == "input" and len(fig["axes"]) == 14
    assert [ax["title"] for ax in panels] == [f"layer {l}\n" + ("2 outliers" if l >= 6 else " ") for l in shown]
    assert [ax["title_color"] for ax in panels] == ["#dc143cff" if l >= 6 else "#000000ff" for l in shown]
    assert {ax["images"][0]["clim"] for ax in panels} == {(0.0, 12.0)} and bar["ylabel"] == "norm / median"
    np.testing.assert_allclose(panels[-1]["images"][0]["data"], (records[0].norms[13][1:] / records[0].medians[13]).reshape(4, 4).numpy())
    assert bar["lines"][0]["y"].tolist() == [3.0, 3.0]
    assert captions["norms_0.png"] == (
        "0-input-with-a-long-name.png: the norm of every patch token at each layer (12 of the 14 scanned layers, evenly "
        "spaced), divided by the median patch norm of this image at that layer, on one colour scale for all layers (0 to "
        "12.0x). Outliers stand out as isolated bright patches; the panel title counts them.")
    assert drawn["norms_3.png"]["axes"][13]["ylim"] == (0.0, 3.0)  # no outliers: the scale still reaches the floor

    # the histogram at the peak layer, on a log count axis, with the floor
    ax = drawn["norm_histogram.png"]["axes"][0]
    assert len(ax["boxes"]) == 80 and ax["yscale"] == "log" and {b["face"] for b in ax["boxes"]} == {"#4682b4ff"}
    assert sum(b["size"][1] for b in ax["boxes"]) == 5 * 16  # every patch of every input, once
    assert ax["legend"] == ["outlier floor 3x median"] and ax["lines"][0]["x"].tolist() == [3.0, 3.0]
    assert (ax["lines"][0]["color"], ax["lines"][0]["style"]) == ("#dc143cff", "--")
    assert (ax["xlabel"], ax["ylabel"], ax["title"]) == ("token norm / median token norm of its input", "tokens (log scale)",
                                                         "norm distribution at layer 6")
    assert captions["norm_histogram.png"] == (
        "Histogram of token norm / median over the 80 patch tokens of all 5 input(s) at layer 6. Artifacts make it bimodal "
        "(Darcet et al. 2024, Fig. 3): a second mode far right of the floor.")

    # per layer: the median and worst max/median ratios against the floor, the outlier share as bars
    lines, bars = drawn["max_ratio_per_layer.png"]["axes"]
    np.testing.assert_allclose(lines["lines"][0]["y"], [row["max_ratio"] for row in report["layers"]])
    np.testing.assert_allclose(lines["lines"][1]["y"], [row["max_ratio_worst"] for row in report["layers"]])
    assert [line["style"] for line in lines["lines"]] == ["-", ":", "--"] and lines["lines"][2]["y"].tolist() == [3.0, 3.0]
    assert lines["legend"] == ["max/median (median over inputs)", "max/median (worst input)", "outlier floor"]
    assert (lines["xlabel"], lines["ylabel"], lines["title"]) == ("layer", "max / median token norm", "artifact strength per layer")
    np.testing.assert_allclose([b["size"][1] for b in bars["boxes"]], [100 * row["outlier_fraction"] for row in report["layers"]])
    assert (bars["ylabel"], bars["ylabel_color"]) == ("outlier tokens (%)", "#dc143cff") and {b["face"][:7] for b in bars["boxes"]} == {"#dc143c"}
    assert all(float(p).is_integer() for p in lines["xtick_pos"])
    assert captions["max_ratio_per_layer.png"].startswith("Per layer: the largest token norm over the median one (lines; median")


def test_vision_figures_without_outliers_attention_or_a_floor(drawn, tmp_path):
    from tests.test_report import vision_record, vision_report

    from PIL import Image

    records = [vision_record(f"c{k}.png", layers=(0, 1, 2)) for k in range(2)]
    records[1].norms[1, 9] = 2.5  # the largest ratio (not an outlier) is at layer 1
    inputs = [ImageInput(r.name, Image.new("RGB", (56, 56))) for r in records]
    report = vision_report(records, rule=OutlierRule(absolute=100.0)).to_dict()
    figures = plots.vision_figures(records, inputs, report, tmp_path)
    fig = drawn["artifact_overlay.png"]
    assert fig["suptitle"] == "high-norm tokens at layer 1, the largest norm ratio (no outliers)"
    assert len(fig["axes"]) == 2 * 2 + 1  # two rows (no CLS attention) and one colorbar, without a floor line
    assert fig["axes"][-1]["lines"] == [] and fig["axes"][0]["title"] == "c1.png\n0 outlier patches"
    assert figures[0].caption.startswith(
        "The artifact picture (Darcet et al. 2024, Fig. 1-2) for the 2 input(s) with the most outlier tokens (here: none; the "
        "ones with the largest norm ratio) at layer 1, the largest norm ratio (no outliers). Top:")
    assert "Bottom" not in figures[0].caption and "(0 to 3.0x;" in figures[0].caption
    assert drawn["norms_0.png"]["axes"][-1]["lines"] == [] and "scanned layers" not in figures[1].caption
    assert drawn["norm_histogram.png"]["axes"][0]["legend"] is None and drawn["norm_histogram.png"]["axes"][0]["lines"] == []


# -- every sentence of the page, for hand-made reports ---------------------------------------------------
def _vision_full() -> dict:
    report = _vision_report(has_artifacts=True, first_outlier_layer=6, outlier_layers=[6, 7, 9], peak_layer=7, outlier_fraction=0.0312,
                            max_ratio=5.25, border_fraction=0.5, corner_fraction=0.125,
                            neighbor_similarity={"outliers": 0.42, "others": 0.61}, sink_share=0.35, sink_share_cls=0.4)
    report["outliers"] = [{"input": "a.png", "layer": 7, "token": 5, "norm": 8.4, "ratio": 8.4, "row": 0, "col": 4}]
    for row in report["layers"]:
        row["registers_norm_ratio"] = 3.0 + row["layer"] / 10 if row["layer"] > 2 else None
    report["layers"][7]["outlier_fraction"] = 0.05
    report["massive_activations"] = [{"input": "a.png", "layer": layer, "token": t, "channel": 100 + t, "value": (-1) ** t * 1000.0 * t}
                                     for layer in (3, 4) for t in range(10)]
    return report


def _text_full(**summary) -> dict:
    report = _vision_report(**{"has_artifacts": True, "has_first_token_sink": True, "first_token_attention_max": 0.8, "sink_epsilon": 0.55,
                               "sink_share": 0.4, "has_massive_activations": True, "has_outliers": True, "outlier_layers": [2, 3],
                               "outlier_fraction": 0.01, "max_ratio": None,
                               "secondary_outliers": [{"text": f" w{i}", "count": 10 - i, "layers": [2, 3], "max_ratio": 4.0 + i} for i in range(6)],
                               **summary})
    report["modality"] = "text"
    report["inputs"] = [{"name": "s.txt", "tokens": 93}, {"name": "t.txt", "tokens": 40}]
    report["massive_activations"] = [{"input": "s.txt", "layer": 11, "token": 0, "channel": 507, "value": -24616.0},
                                     {"input": "s.txt", "layer": 10, "token": 0, "channel": 507, "value": 20000.0}]
    report["outliers"] = [{"input": "s.txt", "layer": 2, "token": 7, "norm": 9.0, "ratio": 6.5, "text": " the"}]
    for row in report["layers"]:
        row["first_token_attention"] = {3: 0.8, 4: 0.5, 5: 0.3, 9: 0.31}.get(row["layer"], 0.1)
    return report


def test_vision_findings_every_sentence():
    report = _vision_full()
    assert report_html.verdict(report) == (
        "Artifacts found: high-norm outlier tokens from layers 6, 7, 9, 3.1 % of patches, up to 8.4× the median norm.", "bad")
    massive = ("at token(s) 0, 1, 2, 3, 4, 5, 6, 7… in channel(s) 100, 101, 102, 103, 104, 105, 106, 107…, layers 3 to 4; "
               "largest -9,000 (layer 3, token 9, channel 109)")
    assert report_html.findings(report) == [
        ("Inputs", "2 image(s), 224×224 px, 257 tokens each"),
        ("Outlier tokens", "from layers 6, 7, 9, 3.1 % of patches, up to 8.4× the median norm (typical input: 5.2×)"),
        ("Peak layer", "layer 7: 5.0 % of patches are outliers"),
        ("Where they sit", "50 % on the image border (a random patch: 23 %), 12 % in a corner"),
        ("Redundant patches?", "outlier patches resemble their 4 neighbours no more than others do: input-embedding cosine 0.42 vs "
                               "0.61 (artifacts take redundant background patches)"),
        ("Attention they draw", "after layer 6, the other tokens send 35.0 % of their attention to the outliers; CLS sends 40.0 %"),
        ("Trained registers", "median norm up to 4.1× the median patch norm (they carry what artifacts carried)"),
        ("Massive activations", massive),
    ]
    report["summary"].update(has_artifacts=False, outlier_layers=[6], border_fraction=None, neighbor_similarity={"outliers": 0.7, "others": None},
                             sink_share=None)
    report["settings"]["attention"] = False
    for row in report["layers"]:
        row["appended_norm_ratio"], row["registers_norm_ratio"] = 2.5, None
    assert report_html.verdict(report) == ("No artifacts found: outlier patches at layer 6 only; artifacts persist over at least 2 layers.", "good")
    rows = dict(report_html.findings(report))
    assert rows["Outlier tokens"] == ("from layer 6, 3.1 % of patches, up to 8.4× the median norm (typical input: 5.2×); at a single layer "
                                      "only, so not counted as persistent artifacts")
    assert rows["Where they sit"] == "not measured"
    assert rows["Redundant patches?"].startswith("outlier patches resemble their 4 neighbours more than others do: input-embedding cosine 0.70 vs 0.00")
    assert rows["Attention they draw"] == "not measured (the scan ran without attention, --no-attention)"
    assert rows["Test-time registers"] == "median norm up to 2.5× the median patch norm (they carry what artifacts carried)"
    assert "Trained registers" not in rows
    report["settings"]["attention"] = True
    assert dict(report_html.findings(report))["Attention they draw"] == "none (no outliers after the first outlier layer)"
    report["summary"]["neighbor_similarity"] = None
    assert dict(report_html.findings(report))["Redundant patches?"] == "not measured"

    empty = _vision_report()
    for row in empty["layers"]:
        row["max_ratio_worst"] = None
    empty["inputs"] = []
    assert report_html.verdict(empty) == ("No artifacts found:", "good")
    assert report_html.findings(empty) == [("Inputs", "none"), ("Outlier tokens", "none (no patches to compare)"),
                                           ("Massive activations", "none (|a| > 100 and > 1000× the layer's median)")]
    clean = _vision_report()
    clean["inputs"][1]["image_size"] = [112, 224]
    assert dict(report_html.findings(clean))["Inputs"] == "2 image(s), 112×224 px, 224×224 px, 257 tokens each"
    assert dict(report_html.findings(clean))["Outlier tokens"] == ("none: the largest patch norm is 2.50× the median of its input (an outlier "
                                                                   "needs 3× or more)")
    assert report_html.verdict(_vision_report(has_artifacts=None)) == (
        "Not enough to judge: too little was measured for a verdict (see the rows below).", "unsure")


def test_text_findings_every_sentence():
    report = _text_full()
    assert report_html.verdict(report) == (
        "Artifacts found: a first-token attention sink (up to 80 % of attention), massive activations (up to 24,616 at token 0) "
        "and high-norm outlier tokens from layers 2 to 3 (up to 6.5× the median norm).", "bad")
    words = "; ".join(f"' w{i}' {10 - i}× (layers 2 to 3, up to {4.0 + i:.1f}×)" for i in range(5))  # five at most
    assert report_html.findings(report) == [
        ("Inputs", "2 text(s), 40 to 93 tokens"),
        ("First-token sink", "yes: up to 80 % of attention lands on the first token (layer 3), 40 % on average over layers; 30 % or more "
                             "in layers 3, 4, 5, 9"),
        ("Sink heads (Sink_ε)", "55 % of (input, layer, head) give the first token more than 0.3 of their attention on average"),
        ("Massive activations", "at token(s) 0 in channel(s) 507, layers 10 to 11; largest -24,616 (layer 11, token 0, channel 507)"),
        ("Outlier tokens", "from layers 2 to 3, 1.0 % of tokens, up to 6.5× the median norm"),
        ("Which tokens", words),
    ]
    quiet = _text_full(has_artifacts=False, has_first_token_sink=False, has_massive_activations=False, has_outliers=False,
                       first_token_attention_max=0.2, secondary_outliers=[])
    for row in quiet["layers"]:
        row["first_token_attention"] = None
    quiet["massive_activations"] = []
    quiet["inputs"] = [{"name": "s.txt", "tokens": 5}]
    assert report_html.verdict(quiet) == ("No artifacts found: no first-token sink, no massive activations, no persistent outlier tokens.", "good")
    rows = dict(report_html.findings(quiet))
    assert rows["Inputs"] == "1 text(s), 5 tokens" and "Which tokens" not in rows
    assert rows["First-token sink"] == "no: up to 20 % of attention lands on the first token, 40 % on average over layers"
    assert report_html.verdict(_text_full(has_first_token_sink=False, has_massive_activations=False, has_outliers=False)) == (
        "Artifacts found: see below.", "bad")
    unmeasured = _text_full(has_artifacts=False, first_token_attention_max=None, sink_epsilon=None)
    assert report_html.verdict(unmeasured) == (
        "No artifacts found in what was measured: no massive activations, no persistent outlier tokens; the first-token sink was not "
        "measured (no token had enough earlier tokens to measure it).", "unsure")
    assert report_html.findings(unmeasured)[1:3] == [
        ("First-token sink", "not measured (no token had enough earlier tokens to measure it)"),
        ("Sink heads (Sink_ε)", "not measured (no token had enough earlier tokens to measure it)")]


def test_page_structure_tables_and_figures(tmp_path):
    vision, text = _vision_full(), _text_full()
    vision["model"], text["model"] = "org/vit", "lm"
    vision["figures"], vision["figure_captions"] = ["a.png"], {"a.png": "A <caption> & more"}
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "lm").mkdir()
    text["figures"], text["figure_captions"] = ["b.png"], {}
    (tmp_path / "lm" / "b.png").write_bytes(b"png b")
    text["outliers"] = [{"input": "s.txt", "layer": 2, "token": t, "norm": 9.0, "ratio": 1.0 + t, "text": f" t{t}"} for t in range(35)]
    text["massive_activations"] = [{"input": "s.txt", "layer": 1, "token": 0, "channel": c, "value": float(c * (-1) ** c)} for c in range(25)]
    page = report_html.render([(vision, ""), (text, "lm")], root=tmp_path)
    assert page.startswith('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">')
    assert "<style>\nbody { font-family: system-ui, sans-serif;" in page and ".bad { background: #fde2e1;" in page
    assert "<p>sinkless 0 · high-norm tokens, attention sinks and massive activations, layer by layer.</p>" in page
    assert ('<li><a href="#org_vit">org/vit</a>: Artifacts found: high-norm outlier tokens from layers 6, 7, 9, 3.1 % of patches, up '
            'to 8.4× the median norm.</li>') in page
    vision_part, text_part = page.split('<section id="org_vit">')[1].split('<section id="lm">')
    assert "<h2>org/vit (vision, 2 inputs)</h2>" in vision_part and '<p class="verdict bad">' in vision_part
    assert ('<figure><img src="data:image/png;base64,iVBORyBmYWtl" alt="a.png"><figcaption><b>a.png</b>: A &lt;caption&gt; &amp; '
            'more</figcaption></figure>') in vision_part
    assert '<img src="data:image/png;base64,cG5nIGI=" alt="b.png"><figcaption><b>b.png</b>: </figcaption>' in text_part
    assert "<tr><td class=k>Peak layer</td><td>layer 7: 5.0 % of patches are outliers</td></tr>" in vision_part
    assert ("<p>Outlier rule: <code>norm &gt; 3 x median</code>; a layer counts when at least\n0.2 % of its patches are outliers.</p>"
            in vision_part)
    head = ("<tr><th>layer</th><th>median norm</th><th>max norm</th><th>max / median</th><th>max / median, worst input</th>"
            "<th>outlier tokens</th>")
    assert head + "<th>attention to outliers, from CLS</th><th>from patches</th></tr>" in vision_part
    assert head + "<th>first-token attention</th><th>Sink_ε heads</th></tr>" in text_part
    assert ("<tr><td>7</td><td>1</td><td>2</td><td>2.00×</td><td>2.50×</td><td>5.00 %</td><td>" + report_html.NOT_APPLICABLE + "</td>"
            in vision_part)
    assert "<td>80.00 %</td>" in text_part  # first-token attention of layer 3
    # top outliers: the largest ratio first, at most 30; text rows show the token text
    top = text_part.split("<h3>Top outlier tokens</h3>")[1].split("</table>")[0]
    assert top.count("<tr>") == 31 and top.index("<td>35.00×</td>") < top.index("<td>34.00×</td>")
    assert "<th>text</th>" in top and "<td>&#x27; t34&#x27;</td>" in top and "<td>35.00×</td><td>&#x27; t34&#x27;</td>" in top
    assert "<th>row</th><th>column</th>" in vision_part.split("<h3>Top outlier tokens</h3>")[1]
    massive = text_part.split("<h3>Massive activations</h3>")[1].split("</table>")[0]
    assert massive.count("<tr>") == 21 and massive.index("<td>-23</td>") < massive.index("<td>22</td>")
    words = text_part.split("<h3>Outlier tokens by text</h3>")[1].split("</table>")[0]
    assert "<th>token</th><th>times</th><th>layers</th><th>up to (norm / median)</th>" in words
    assert "<td>&#x27; w0&#x27;</td><td>10</td><td>layers 2 to 3</td><td>4.00×</td>" in words
    raw = vision_part.split("<details>")[1]
    assert "<tr><td class=k>outlier_layers</td><td>[6, 7, 9]</td></tr>" in raw and "<td class=k>max_ratio</td><td>5.25</td>" in raw
    assert '<tr><td class=k>neighbor_similarity</td><td>{&quot;outliers&quot;: 0.42, &quot;others&quot;: 0.61}</td></tr>' in raw
    linked = report_html.render([(vision, "sub")])  # no root: figures are linked, not embedded
    assert '<img src="sub/a.png" alt="a.png">' in linked
    vision["figures"], vision["outliers"], vision["massive_activations"] = [], [], []
    bare = report_html.render([(vision, "")])
    assert "<h3>Figures</h3><p>none</p>" in bare and "<h3>Top outlier tokens</h3><p>none</p>" in bare
    assert "<h3>Massive activations</h3><p>none</p>" in bare and "Outlier tokens by text" not in bare
    vision["settings"]["attention"] = False
    vision["summary"]["sink_share"] = vision["summary"]["border_fraction"] = None
    off = report_html.render([(vision, "")]).split("<details>")[1]
    assert '<tr><td class=k>sink_share</td><td><span class="na">not measured</span></td></tr>' in off
    assert f"<tr><td class=k>border_fraction</td><td>{report_html.NOT_APPLICABLE}</td></tr>" in off


# -- the page's tables, cell by cell, and what appears only when it applies --------------------------------
NA = report_html.NOT_APPLICABLE


def _between(page: str, start: str, end: str) -> str:
    return page.split(start, 1)[1].split(end, 1)[0]


def test_page_tables_every_header_cell_and_row_boundary():
    vision, text = _vision_full(), _text_full()
    vision["model"], text["model"] = "vit", "lm"
    vision["outliers"].append({"input": "b.png", "layer": 6, "token": 9, "norm": 5.0, "ratio": 5.5, "row": 1, "col": 2})
    vision["massive_activations"] = [{"input": "a.png", "layer": 3, "token": 0, "channel": 100, "value": 150.0},
                                     {"input": "b.png", "layer": 4, "token": 2, "channel": 102, "value": -2000.0}]
    vision["figures"], vision["figure_captions"] = ["a.png", "b.png"], {"a.png": "first", "b.png": "second"}
    text["layers"][3]["sink_epsilon"] = 0.55
    page = report_html.render([(vision, "f"), (text, "")])
    # two models: one entry each in the contents, one section each, nothing in between
    assert ('<li><a href="#vit">vit</a>: Artifacts found: high-norm outlier tokens from layers 6, 7, 9, 3.1 % of patches, up to 8.4× '
            'the median norm.</li><li><a href="#lm">lm</a>: Artifacts found: ') in page
    assert '.</li></ul>\n\n<section id="vit">' in page and '</section>\n<section id="lm">' in page and page.count("<section") == 2
    vision_part, text_part = page.split('<section id="vit">')[1].split('<section id="lm">')
    # the findings: one row per finding, back to back
    assert ("<tr><td class=k>Inputs</td><td>2 image(s), 224×224 px, 257 tokens each</td></tr><tr><td class=k>Outlier tokens</td><td>from "
            "layers 6, 7, 9, 3.1 % of patches") in vision_part
    assert ('<figure><img src="f/a.png" alt="a.png"><figcaption><b>a.png</b>: first</figcaption></figure><figure><img src="f/b.png" '
            'alt="b.png"><figcaption><b>b.png</b>: second</figcaption></figure>\n<h3>Per layer</h3>') in vision_part
    # per layer: rows back to back, each closed
    assert ("<td>2.50×</td><td>0.00 %</td><td>" + NA + "</td><td>" + NA + "</td></tr><tr><td>7</td><td>1</td><td>2</td><td>2.00×</td>"
            "<td>2.50×</td><td>5.00 %</td><td>" + NA + "</td><td>" + NA + "</td></tr><tr><td>8</td>") in vision_part
    assert ("<tr><td>3</td><td>1</td><td>2</td><td>2.00×</td><td>2.50×</td><td>0.00 %</td><td>80.00 %</td><td>55.00 %</td></tr>"
            "<tr><td>4</td><td>1</td><td>2</td><td>2.00×</td><td>2.50×</td><td>0.00 %</td><td>50.00 %</td><td>" + NA + "</td></tr>") in text_part
    # a vision page has no table of outlier tokens by text: the per-layer table is followed by the top outliers
    assert _between(vision_part, "<h3>Per layer</h3>", "<h3>Top outlier tokens</h3>").split("</tbody></table>")[-1].strip() == ""
    assert _between(vision_part, "<h3>Top outlier tokens</h3>", "\n") == (
        "<table><thead><tr><th>input</th><th>layer</th><th>token</th><th>norm</th><th>norm / median</th><th>row</th><th>column</th></tr>"
        "</thead><tbody><tr><td>a.png</td><td>7</td><td>5</td><td>8.4</td><td>8.40×</td><td>0</td><td>4</td></tr>"
        "<tr><td>b.png</td><td>6</td><td>9</td><td>5</td><td>5.50×</td><td>1</td><td>2</td></tr></tbody></table>")
    assert _between(vision_part, "<h3>Massive activations</h3>", "\n") == (
        "<table><thead><tr><th>input</th><th>layer</th><th>token</th><th>channel</th><th>value</th></tr></thead><tbody>"
        "<tr><td>b.png</td><td>4</td><td>2</td><td>102</td><td>-2000</td></tr>"
        "<tr><td>a.png</td><td>3</td><td>0</td><td>100</td><td>150</td></tr></tbody></table>")
    # text: the outlier tokens by text come right after the per-layer table
    assert "</tbody></table>\n<h3>Outlier tokens by text</h3><table><thead><tr><th>token</th>" in text_part
    assert ("<tr><td>&#x27; w0&#x27;</td><td>10</td><td>layers 2 to 3</td><td>4.00×</td></tr><tr><td>&#x27; w1&#x27;</td><td>9</td>"
            "<td>layers 2 to 3</td><td>5.00×</td></tr>") in text_part
    assert _between(text_part, "<h3>Top outlier tokens</h3>", "\n") == (
        "<table><thead><tr><th>input</th><th>layer</th><th>token</th><th>norm</th><th>norm / median</th><th>text</th></tr></thead>"
        "<tbody><tr><td>s.txt</td><td>2</td><td>7</td><td>9</td><td>6.50×</td><td>&#x27; the&#x27;</td></tr></tbody></table>")
    assert ("<tr><td class=k>has_artifacts</td><td>True</td></tr><tr><td class=k>first_outlier_layer</td><td>6</td></tr>"
            in vision_part.split("<details>")[1])


def test_page_sink_epsilon_column_and_raw_nulls_follow_the_attention_setting():
    text = _text_full(sink_share=None)
    text["layers"][3]["sink_epsilon"] = 0.55
    page = report_html.render([(text, "")])
    assert "<td>80.00 %</td><td>55.00 %</td></tr>" in page
    # attention was measured: a null reads "does not apply", in the table and in the raw summary
    assert f"<tr><td class=k>sink_share</td><td>{NA}</td></tr>" in page.split("<details>")[1]
    assert '<span class="na">not measured</span>' not in page
    text["settings"]["attention"] = False
    text["layers"][3]["first_token_attention"] = None
    off = report_html.render([(text, "")])
    layer3 = _between(off, "<tr><td>3</td>", "</tr>")
    assert layer3.endswith('<td><span class="na">not measured</span></td><td>55.00 %</td>')
    assert '<tr><td class=k>sink_share</td><td><span class="na">not measured</span></td></tr>' in off.split("<details>")[1]
    # settings written before the attention flag existed: attention counts as measured
    del text["settings"]["attention"]
    old = report_html.render([(text, "")])
    assert f"<tr><td class=k>sink_share</td><td>{NA}</td></tr>" in old and '<span class="na">not measured</span>' not in old
    vision = _vision_report(has_artifacts=True, first_outlier_layer=6, outlier_layers=[6, 7], peak_layer=6, outlier_fraction=0.01)
    del vision["settings"]["attention"]
    assert dict(report_html.findings(vision))["Attention they draw"] == "none (no outliers after the first outlier layer)"


def test_page_outlier_rule_min_fraction_and_missing_keys():
    vision = _vision_report()
    vision["settings"]["min_fraction"] = 0.01
    rule = "<p>Outlier rule: <code>norm &gt; 3 x median</code>; a layer counts when at least\n{} of its {} are outliers.</p>"
    assert rule.format("1.0 %", "patches") in report_html.render([(vision, "")])
    del vision["settings"]["min_fraction"], vision["figures"]  # an older report.json: the defaults
    page = report_html.render([(vision, "")])
    assert rule.format("0.2 %", "patches") in page and "<h3>Figures</h3><p>none</p>" in page
    text = _text_full()
    assert rule.format("0.2 %", "tokens") in report_html.render([(text, "")])
    # a long list in the raw summary is cut at 200 characters
    text["summary"]["per_input"] = list(range(100, 200))
    raw = report_html.render([(text, "")]).split("<details>")[1]
    cell = _between(raw, "<tr><td class=k>per_input</td><td>", "</td></tr>")
    assert len(cell) == 200 and cell == json.dumps(list(range(100, 200)))[:200] and cell.endswith("138, 139,")


def test_words_only_where_they_apply():
    # text: a token that is the largest norm but no outlier reads in the singular
    text = _text_full(has_outliers=False, outlier_layers=[], has_first_token_sink=False, has_artifacts=False, secondary_outliers=[])
    text["massive_activations"], text["outliers"] = [], []
    rows = dict(report_html.findings(text))
    assert rows["Outlier tokens"] == "none: the largest token norm is 2.50× the median of its input (an outlier needs 3× or more)"
    page = report_html.render([(text, "")])
    assert "Outlier tokens by text" not in page and "<h3>Top outlier tokens</h3><p>none</p>" in page
    # vision: a stray secondary_outliers key shows no table of token text
    vision = _vision_full()
    vision["summary"]["secondary_outliers"] = [{"text": " x", "count": 1, "layers": [6], "max_ratio": 4.0}]
    assert "Outlier tokens by text" not in report_html.render([(vision, "")])
    # a word seen at no listed layer, and a token text that is not a string
    odd = _text_full(secondary_outliers=[{"text": 42, "count": 1, "layers": [], "max_ratio": 3.5}])
    assert dict(report_html.findings(odd))["Which tokens"] == "42 1× (no layer, up to 3.5×)"
    assert "<tr><td>42</td><td>1</td><td>no layer</td><td>3.50×</td></tr>" in report_html.render([(odd, "")])
    # massive activations flagged but none listed: the verdict names them without a number
    bare = _text_full(has_first_token_sink=False, has_outliers=False)
    bare["massive_activations"] = []
    assert report_html.verdict(bare) == ("Artifacts found: massive activations.", "bad")
    # outliers and others equally like their neighbours: "no more"
    tie = _vision_full()
    tie["summary"]["neighbor_similarity"] = {"outliers": 0.5, "others": 0.5}
    assert dict(report_html.findings(tie))["Redundant patches?"].startswith(
        "outlier patches resemble their 4 neighbours no more than others do: input-embedding cosine 0.50 vs 0.50")


@pytest.mark.parametrize("n, more", [(8, ""), (9, "…")])
def test_massive_sentence_lists_eight_tokens_and_channels_then_an_ellipsis(n, more):
    report = _vision_report()
    report["massive_activations"] = [{"input": "a.png", "layer": 2, "token": t, "channel": 200 + t, "value": 150.0 + t} for t in range(n)]
    tokens, channels = ", ".join(str(t) for t in range(8)), ", ".join(str(200 + t) for t in range(8))
    assert dict(report_html.findings(report))["Massive activations"] == (
        f"at token(s) {tokens}{more} in channel(s) {channels}{more}, layer 2; largest {150 + n - 1} (layer 2, token {n - 1}, channel {199 + n})")


# -- the vision figures' layout, fonts and styles; the helpers behind them (read back, hand-made inputs) ------------
@pytest.fixture
def figs(drawn, monkeypatch):
    """{PNG name: the figure itself} besides ``drawn``, for what the facts leave out (font sizes, subplot grid, layering)."""
    kept = {}
    inner = plots.save

    def spy(fig, folder, name):
        kept[name] = fig
        return inner(fig, folder, name)

    monkeypatch.setattr(plots, "save", spy)
    return kept


def _subplot_inches(fig) -> tuple:
    """(left, right, top, bottom) margins of the subplot grid in inches, then (wspace, hspace)."""
    width, height = fig.get_size_inches()
    p = fig.subplotpars
    return tuple(round(float(v), 6) for v in (p.left * width, (1 - p.right) * width, (1 - p.top) * height, p.bottom * height,
                                              p.wspace, p.hspace))


def _png(path):
    from PIL import Image

    with Image.open(path) as png:
        return png.size, dict(png.info)


# a user's style: another colormap, save resolution, spacing and legend place; the figures keep their own
_USER_STYLE = {"image.cmap": "gray", "savefig.dpi": 72, "figure.subplot.wspace": 0.5, "figure.subplot.hspace": 0.5,
               "legend.loc": "lower right", "font.size": 13.0}


def test_vision_figures_size_margins_fonts_and_styles(drawn, figs, tmp_path):
    import matplotlib

    from tests.test_report import vision_report

    records, inputs = _vision_inputs()
    report = vision_report(records).to_dict()
    with matplotlib.rc_context(_USER_STYLE):
        figures = plots.vision_figures(records, inputs, report, tmp_path)

    # every PNG at 100 dpi whatever the user's savefig.dpi, without the matplotlib version in it
    for figure in figures:
        width, height = figs[figure.name].get_size_inches()
        size, info = _png(tmp_path / figure.name)
        assert size == (round(100 * width), round(100 * height)) and "Software" not in info, figure.name

    # the signature picture: 4 columns x 3 rows of 2.2 x 2.25 inches, fixed margins, tight panels
    fig, overlay = drawn["artifact_overlay.png"], figs["artifact_overlay.png"]
    assert fig["size"] == (10.4, 7.45) and _subplot_inches(overlay) == (0.45, 1.15, 0.75, 0.05, 0.06, 0.08)
    pictures, maps, attention, norm_bar, attention_bar = fig["axes"][0:4], fig["axes"][4:8], fig["axes"][8:12], fig["axes"][12], fig["axes"][13]
    assert {ax["title_size"] for ax in pictures} == {8.0} and overlay._suptitle.get_fontsize() == 10.0
    assert [overlay.axes[i].yaxis.label.get_fontsize() for i in (0, 4, 8)] == [8.0] * 3
    assert [ax["box_widths"] for ax in pictures] == [[1.2, 1.2], [1.2], [1.2], []]
    assert all(ax["interpolation"] == ["nearest"] for ax in maps + attention)
    assert {ax["images"][0]["cmap"] for ax in attention} == {"viridis"}  # not the user's grey
    assert norm_bar["colorbar"] == {"cmap": "inferno", "norm": "Normalize", "range": (0.0, 12.0)}
    assert attention_bar["colorbar"] == {"cmap": "viridis", "norm": "Normalize", "range": (0.0625, 4.0)}
    # each colorbar 0.12 in wide, 0.08 in right of its row, exactly as tall as the row's images are drawn
    for bar, row in ((norm_bar, maps), (attention_bar, attention)):
        left, right, top, bottom = bar["margins"]
        assert left == pytest.approx(10.4 - min(ax["margins"][1] for ax in row) + 0.08, abs=1e-5)
        assert 10.4 - left - right == pytest.approx(0.12, abs=1e-5)
        assert (top, bottom) == pytest.approx((min(ax["margins"][2] for ax in row), min(ax["margins"][3] for ax in row)), abs=1e-5)
        assert bar["ytick_style"] == [(7.0, 0.0)]
    assert [overlay.axes[i].yaxis.label.get_fontsize() for i in (12, 13)] == [8.0, 8.0]
    assert norm_bar["lines"][0]["width"] == 2.0

    # per-input norm maps: the input and 12 layers in one row, 0.95 in a panel, fixed margins
    fig, strip = drawn["norms_0.png"], figs["norms_0.png"]
    assert fig["size"] == (13.35, 1.75) and _subplot_inches(strip) == (0.05, 0.95, 0.6, 0.05, 0.06, 0.2)
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in strip.axes[:13]} == {(1, 13)}
    assert {ax["title_size"] for ax in fig["axes"][:13]} == {8.0} and strip._suptitle.get_fontsize() == 9.0
    assert all(ax["interpolation"] == ["nearest"] for ax in fig["axes"][1:13])
    assert fig["axes"][13]["colorbar"] == {"cmap": "inferno", "norm": "Normalize", "range": (0.0, 12.0)}

    # histogram and per-layer strength: 5 x 3 and 5.5 x 3 inches, fixed margins, small fonts
    fig = drawn["norm_histogram.png"]
    ax = fig["axes"][0]
    assert fig["size"] == (5.0, 3.0) and ax["margins"] == _inches((0.7, 0.15, 0.35, 0.5))
    assert ax["legend_sizes"] == [8.0] and ax["title_size"] == 9.0
    fig, per_layer = drawn["max_ratio_per_layer.png"], figs["max_ratio_per_layer.png"]
    lines, bars = fig["axes"]
    assert fig["size"] == (5.5, 3.0) and lines["margins"] == bars["margins"] == _inches((0.7, 0.7, 0.35, 0.5))
    assert [s["marker"] for s in lines["line_style"]] == ["o", ".", "None"]
    floor = lines["lines"][2]
    assert (floor["color"], floor["width"], floor["label"]) == ("#dc143cff", 1.0, "outlier floor")
    assert {b["face"] for b in bars["boxes"]} == {"#dc143c33"}  # translucent bars
    front, back = per_layer.axes
    assert front.get_zorder() > back.get_zorder() and not front.patch.get_visible()  # the lines over the bars, not hidden
    assert lines["legend_sizes"] == [7.0] and lines["title_size"] == 9.0
    legend, box = front.get_legend().get_window_extent(), front.get_window_extent()
    assert legend.x0 - box.x0 < 20 and box.y1 - legend.y1 < 20  # upper left
    assert {f.name: f.caption for f in figures}["max_ratio_per_layer.png"] == (
        "Per layer: the largest token norm over the median one (lines; median over inputs and the worst input) against the "
        "outlier floor, and the share of tokens that are outliers (bars, right axis). Artifacts appear from a middle layer on "
        "and persist.")


def test_vision_figures_of_one_grey_input_at_one_layer(drawn, tmp_path):
    from PIL import Image

    from tests.test_report import vision_record, vision_report

    # one input, one scanned layer (5), medians 2, one outlier (patch 5: row 1, column 1) of 4.5x, a 56 x 28 grey image
    name = "dir/abcdefghijklmnopqr.png"  # 22 characters: shown whole
    record = vision_record(name, outliers_at={0: {6: 9.0}}, layers=(5,), base=2.0, cls_attention=torch.linspace(0, 1, 17))
    record.image_hw = (28, 56)
    inputs = [ImageInput(name, Image.new("L", (40, 30), 100))]
    report = vision_report([record]).to_dict()
    figures = plots.vision_figures([record], inputs, report, tmp_path)
    captions = {f.name: f.caption for f in figures}
    assert list(captions) == ["artifact_overlay.png", "norms_0.png", "norm_histogram.png", "max_ratio_per_layer.png"]

    picture, norm_map, attention = drawn["artifact_overlay.png"]["axes"][:3]
    assert picture["title"] == "abcdefghijklmnopqr.png\n1 outlier patch"
    np.testing.assert_array_equal(picture["images"][0]["data"], np.asarray(Image.new("RGB", (56, 28), (100, 100, 100))))
    assert [(b["xy"], b["size"]) for b in picture["boxes"]] == [((14.0, 7.0), (14.0, 7.0))]  # 14 x 7 pixel patches
    assert norm_map["images"][0]["clim"] == (0.0, 4.5) and attention["ylabel"] == "CLS attention\nlayer 5"
    assert "the last scanned layer (5), mean over heads, one scale (0.062 to 1)" in captions["artifact_overlay.png"]

    fig = drawn["norms_0.png"]
    assert fig["suptitle"] == "token norm per layer: abcdefghijklmnopqr.png" and len(fig["axes"]) == 3
    assert fig["axes"][1]["title"] == "layer 5\n1 outlier" and fig["axes"][2]["ylim"] == (0.0, 4.5)
    assert captions["norms_0.png"] == (
        "abcdefghijklmnopqr.png: the norm of every patch token at each layer, divided by the median patch norm of this image "
        "at that layer, on one colour scale for all layers (0 to 4.5x). Outliers stand out as isolated bright patches; the "
        "panel title counts them.")

    # the histogram spans the ratios (1x to 4.5x), not the norms
    boxes = drawn["norm_histogram.png"]["axes"][0]["boxes"]
    assert boxes[0]["xy"][0] == pytest.approx(1.0) and boxes[-1]["xy"][0] + boxes[-1]["size"][0] == pytest.approx(4.5)
    assert sum(b["size"][1] for b in boxes) == 16

    # the strength per layer is drawn at the layers' numbers, on whole-number ticks (three layers: 3, 4 and 5)
    lines = drawn["max_ratio_per_layer.png"]["axes"][0]
    assert [line["x"].tolist() for line in lines["lines"][:2]] == [[5.0], [5.0]]
    rows = [{"layer": 3 + i, "max_ratio": 1.5 + i, "max_ratio_worst": 2.0 + i, "outlier_fraction": None if i == 0 else 0.1 * i}
            for i in range(3)]
    plots._ratio_per_layer({"layers": rows, "settings": {"rule": {"floor": 3.0}}}, tmp_path)
    lines, bars = drawn["max_ratio_per_layer.png"]["axes"]
    assert [line["x"].tolist() for line in lines["lines"][:2]] == [[3.0, 4.0, 5.0]] * 2
    assert lines["xtick_pos"] == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert [b["size"][1] for b in bars["boxes"]] == pytest.approx([0.0, 10.0, 20.0])

    # a name of 41 characters is cut to 40 in the title of its norm maps
    long_name = "a" * 37 + ".png"
    plots._norm_strip(vision_record(long_name, layers=(5,)), ImageInput(long_name, Image.new("RGB", (8, 8))), report, tmp_path, "long.png")
    assert drawn["long.png"]["suptitle"] == "token norm per layer: " + "a" * 37 + ".p…"


def test_focus_layer_and_the_order_of_the_inputs():
    from tests.test_report import vision_record

    records = [vision_record(layers=(3, 5, 7))]

    def report(peak, worst):
        return {"summary": {"peak_layer": peak}, "layers": [{"max_ratio_worst": w} for w in worst]}

    assert plots.focus_layer(records, report(5, [1.0, 2.0, 9.0])) == 1  # the peak outlier layer, not the largest ratio
    assert plots.focus_layer(records, report(None, [1.5, 2.0, 9.0])) == 2  # no outliers: the largest ratio
    assert plots.focus_layer(records, report(None, [None, 1.0, 1.0])) == 1  # a ratio not measured counts as 0
    assert plots.focus_layer(records, {"summary": {}, "layers": []}) == 2  # nothing to go by: the last layer

    # same outliers at the layer: the most outliers overall first; then the largest ratio (norm / median, not norm)
    at_layer = vision_record("at-layer", outliers_at={0: {3: 9.0}})
    everywhere = vision_record("everywhere", outliers_at={0: {3: 9.0}, 1: {3: 9.0}})
    assert plots.ranked([at_layer, everywhere], 0) == [1, 0]
    small = vision_record("small-median")
    small.norms[0, 3] = 2.5  # 2.5x a median of 1
    large = vision_record("large-median", base=2.0)
    large.norms[0, 3] = 4.4  # 2.2x a median of 2
    assert plots.ranked([large, small], 0) == [1, 0]
    # an input without body tokens has no ratio: after a flat one (1x)
    empty, flat = vision_record("empty"), vision_record("flat")
    empty.body = torch.zeros(17, dtype=torch.bool)
    assert plots.ranked([empty, flat], 0) == [1, 0]


def test_place_margins_in_inches_and_save_at_100_dpi(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(_USER_STYLE):
        fig, _ = plt.subplots(2, 2, figsize=(4, 3))
        plots.place(fig, left=0.4, right=0.2, top=0.3, bottom=0.6)
        assert _subplot_inches(fig) == (0.4, 0.2, 0.3, 0.6, 0.2, 0.2)  # the spacing by default, not the user's
        plots.place(fig, left=0.4, right=0.2, top=0.3, bottom=0.6, wspace=0.06, hspace=0.08)
        assert _subplot_inches(fig)[4:] == (0.06, 0.08)
        other = plt.figure()  # the current figure: saving ``fig`` must close ``fig``, not this one
        try:
            assert plots.save(fig, tmp_path, "f.png") == "f.png"
            assert not plt.fignum_exists(fig.number) and plt.fignum_exists(other.number)
        finally:
            plt.close(other)
    size, info = _png(tmp_path / "f.png")
    assert size == (400, 300) and "Software" not in info
