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
