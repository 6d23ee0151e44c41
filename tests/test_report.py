"""The scan report's verdicts from hand-made per-input records: every number known by construction."""

from __future__ import annotations

import pytest
import torch

from sinkless._version import __version__
from sinkless.adapters import TokenLayout
from sinkless.scan import summary_lines
from sinkless.scan.measure import InputRecord, ScanSettings
from sinkless.scan.report import MIN_FRACTION, build_report

GRID = (4, 4)  # 16 patches after one CLS token: token t is patch t - 1


def vision_record(name="img", outliers_at=None, layers=(0, 1, 2), base=1.0, **extra) -> InputRecord:
    """CLS + 4x4 patches; every body norm ``base`` (CLS 50), and ``{layer index: {token: norm}}`` outliers."""
    layout = TokenLayout(17, 1, 0, GRID)
    body = torch.zeros(17, dtype=torch.bool)
    body[1:] = True
    L = len(layers)
    norms = torch.full((L, 17), base)
    norms[:, 0] = 50.0  # a high-norm CLS is not a body token: it never counts
    outliers = torch.zeros(L, 17, dtype=torch.bool)
    for li, tokens in (outliers_at or {}).items():
        for token, value in tokens.items():
            norms[li, token] = value
            outliers[li, token] = True
    return InputRecord(
        name, layout, list(layers), body, norms, torch.full((L,), 3.0 * base), outliers, torch.full((L,), base), image_hw=(56, 56), **extra
    )


def text_record(n=8, name="text", layers=(0, 1, 2), outliers_at=None, first_token=None, alpha0=None, tokens=None) -> InputRecord:
    """``n`` text tokens, body = all but the first; norms 1 except ``{layer index: {token: norm}}``."""
    layout = TokenLayout(n)
    body = torch.ones(n, dtype=torch.bool)
    body[0] = False
    L = len(layers)
    norms = torch.ones(L, n)
    outliers = torch.zeros(L, n, dtype=torch.bool)
    for li, marked in (outliers_at or {}).items():
        for token, value in marked.items():
            norms[li, token] = value
            outliers[li, token] = True
    return InputRecord(
        name, layout, list(layers), body, norms, torch.full((L,), 3.0), outliers, torch.ones(L),
        first_token=first_token, alpha0=alpha0, tokens=tokens if tokens is not None else [f"t{i}" for i in range(n)],
    )


def vision_report(records, **kw):
    return build_report("hand-vit", "vision", records, ScanSettings(**kw))


def text_report(records, **kw):
    return build_report("hand-lm", "text", records, ScanSettings(**kw))


# -- outlier fraction and the artifact verdict ------------------------------------------------
def test_outlier_fraction_counts_body_tokens_only():
    # one outlier patch in 16 at layers 1 and 2; the high-norm CLS is not a body token
    report = vision_report([vision_record(outliers_at={1: {7: 9.0}, 2: {7: 9.0}})])
    fractions = [row["outlier_fraction"] for row in report.layers]
    assert fractions == [0.0, 1 / 16, 1 / 16]
    assert report.summary["outlier_fraction"] == 1 / 16
    two = vision_report([vision_record(outliers_at={1: {7: 9.0}}), vision_record(outliers_at={1: {3: 9.0, 4: 9.0}})])
    assert two.layers[1]["outlier_fraction"] == 3 / 32


def test_artifacts_need_outliers_in_at_least_two_layers():
    one = vision_report([vision_record(outliers_at={1: {7: 9.0}})])
    assert one.summary["outlier_layers"] == [1] and one.summary["first_outlier_layer"] == 1
    assert one.summary["has_artifacts"] is False  # a single layer is a fluke, not an artifact
    two = vision_report([vision_record(outliers_at={1: {7: 9.0}, 2: {7: 9.0}})])
    assert two.summary["outlier_layers"] == [1, 2]
    assert two.summary["has_artifacts"] is True
    # a scan of one layer can only ever see one
    single = vision_report([vision_record(outliers_at={0: {7: 9.0}}, layers=(5,))])
    assert single.summary["outlier_layers"] == [5] and single.summary["has_artifacts"] is True
    clean = vision_report([vision_record()])
    assert clean.summary["has_artifacts"] is False and clean.summary["first_outlier_layer"] is None
    assert clean.summary["peak_layer"] is None and clean.summary["outlier_fraction"] == 0.0


def test_text_outliers_also_need_two_layers():
    low = torch.tensor([0.05, 0.05, 0.05])  # first-token attention measured and low: no sink verdict
    one = text_report([text_record(outliers_at={2: {3: 9.0}}, first_token=low)])
    assert one.summary["has_outliers"] is False and one.summary["has_artifacts"] is False
    two = text_report([text_record(outliers_at={1: {3: 9.0}, 2: {3: 9.0}}, first_token=low)])
    assert two.summary["has_outliers"] is True and two.summary["has_artifacts"] is True


def test_min_fraction_is_inclusive():
    assert MIN_FRACTION == 0.002
    # 1 outlier among exactly 500 body tokens is 0.2 %: a layer with outliers; among 501 it is not
    at = text_report([text_record(n=501, outliers_at={0: {9: 9.0}, 1: {9: 9.0}})])
    assert at.layers[0]["outlier_fraction"] == MIN_FRACTION
    assert at.summary["outlier_layers"] == [0, 1]
    below = text_report([text_record(n=502, outliers_at={0: {9: 9.0}, 1: {9: 9.0}})])
    assert below.summary["outlier_layers"] == []
    assert at.settings["min_fraction"] == MIN_FRACTION


def test_first_and_peak_layer():
    # layer 0: 1 outlier, layer 1: 3, layer 2: 2 -> first 0, peak 1; summary fraction = mean over outlier layers
    record = vision_record(outliers_at={0: {1: 9.0}, 1: {1: 9.0, 2: 9.0, 3: 9.0}, 2: {1: 9.0, 2: 9.0}})
    report = vision_report([record])
    assert report.summary["first_outlier_layer"] == 0 and report.summary["peak_layer"] == 1
    assert report.summary["outlier_fraction"] == pytest.approx((1 + 3 + 2) / 3 / 16)


# -- per-layer numbers ----------------------------------------------------------------------------
def test_layer_norm_statistics():
    a = vision_record("a", outliers_at={1: {5: 8.0}}, base=2.0)  # median 2, max 8 -> ratio 4
    b = vision_record("b", outliers_at={1: {5: 3.0}}, base=1.0)  # median 1, max 3 -> ratio 3
    c = vision_record("c", outliers_at={1: {5: 10.0}}, base=1.0)  # median 1, max 10 -> ratio 10
    report = vision_report([a, b, c])
    row = report.layers[1]
    assert row["layer"] == 1
    assert row["max_ratio"] == 4.0  # median over inputs
    assert row["max_ratio_worst"] == 10.0
    assert row["norm_max"] == 10.0  # the CLS (50) is not a body token
    assert row["norm_median"] == 1.0  # over the 48 body norms of all inputs
    assert row["outlier_threshold_median"] == 3.0  # thresholds 6, 3, 3
    assert report.layers[0]["max_ratio"] == 1.0
    assert report.summary["max_ratio"] == 4.0
    assert report.summary["n_inputs"] == 3


def test_outlier_entries_name_input_layer_token_position_and_ratio():
    record = vision_record("pic", outliers_at={2: {7: 6.0}}, base=2.0)  # token 7 = patch 6 = row 1, col 2
    report = vision_report([record])
    assert report.outliers == [{"input": "pic", "layer": 2, "token": 7, "norm": 6.0, "ratio": 3.0, "row": 1, "col": 2}]
    text = text_report([text_record(outliers_at={1: {4: 5.0}}, tokens=["a", "b", "c", "d", " the", "f", "g", "h"])])
    assert text.outliers == [{"input": "text", "layer": 1, "token": 4, "norm": 5.0, "ratio": 5.0, "text": " the"}]


def test_border_and_corner_fractions_at_the_peak_layer():
    # outliers at patches 0 (corner), 1 (border) and 5 (inside) of the 4x4 grid: tokens 1, 2, 6
    report = vision_report([vision_record(outliers_at={1: {1: 9.0, 2: 9.0, 6: 9.0}, 2: {1: 9.0}})])
    s = report.summary
    assert s["peak_layer"] == 1
    assert s["border_fraction"] == pytest.approx(2 / 3)
    assert s["corner_fraction"] == pytest.approx(1 / 3)
    assert s["border_fraction_expected"] == 12 / 16


def test_neighbor_similarity_of_outliers_and_others():
    sim = torch.full((16,), 0.5)
    sim[6] = 0.9
    record = vision_record(outliers_at={1: {7: 9.0}, 2: {7: 9.0}}, neighbor_similarity=sim)
    ns = vision_report([record]).summary["neighbor_similarity"]
    assert ns["outliers"] == pytest.approx(0.9) and ns["others"] == pytest.approx(0.5)


def test_attention_shares_and_sink_share_after_the_first_outlier_layer():
    shares = dict(share_cls=torch.tensor([0.1, 0.2, 0.6]), share_body=torch.tensor([0.3, 0.4, 0.5]), share_all=torch.tensor([0.05, 0.25, 0.45]))
    other = dict(share_cls=torch.tensor([0.3, 0.4, float("nan")]), share_body=torch.tensor([0.1, 0.2, 0.3]), share_all=torch.tensor([0.15, 0.35, 0.55]))
    report = vision_report([vision_record("a", outliers_at={1: {7: 9.0}, 2: {7: 9.0}}, **shares), vision_record("b", **other)])
    row = report.layers[2]
    assert row["outlier_attention_share"] == pytest.approx(0.5)
    assert row["outlier_attention_share_cls"] == pytest.approx(0.6)  # NaN (no outliers) is left out
    assert row["outlier_attention_share_patches"] == pytest.approx(0.4)
    # sink share: layers after the first outlier layer (1) only -> layer 2
    assert report.summary["sink_share"] == pytest.approx(0.5)
    assert report.summary["sink_share_cls"] == pytest.approx(0.6)


def test_register_and_appended_token_norm_ratios():
    layout = TokenLayout(1 + 2 + 16 + 1, 1, 2, GRID, 1)  # CLS, 2 registers, 16 patches, 1 appended
    body = torch.zeros(20, dtype=torch.bool)
    body[layout.body] = True
    norms = torch.ones(1, 20)
    norms[0, 1:3] = torch.tensor([4.0, 6.0])  # registers: median 4 (the lower middle)
    norms[0, 19] = 8.0
    record = InputRecord("r", layout, [0], body, norms, torch.tensor([3.0]), torch.zeros(1, 20, dtype=torch.bool), torch.ones(1), image_hw=(56, 56))
    row = vision_report([record]).layers[0]
    assert row["registers_norm_ratio"] == 4.0 and row["appended_norm_ratio"] == 8.0
    assert row["norm_max"] == 1.0  # registers and appended tokens are not patches
    assert "registers_norm_ratio" not in vision_report([vision_record()]).layers[0]


# -- text: first-token sinks, Sink_eps, massive activations, secondary outliers ------------------
def test_first_token_sink_verdict_at_exactly_30_percent():
    at = text_report([text_record(first_token=torch.tensor([0.1, 0.3, 0.2]))])
    assert [row["first_token_attention"] for row in at.layers] == pytest.approx([0.1, 0.3, 0.2])
    assert at.summary["first_token_attention_max"] == pytest.approx(0.3)
    assert at.summary["sink_share"] == pytest.approx(0.2)
    assert at.summary["has_first_token_sink"] is True and at.summary["has_artifacts"] is True
    below = text_report([text_record(first_token=torch.tensor([0.1, 0.29, 0.2]))])
    assert below.summary["has_first_token_sink"] is False and below.summary["has_artifacts"] is False
    # not measured (no first-token attention in the record): no verdict either way, and a note says why
    none = text_report([text_record()])
    assert none.summary["has_first_token_sink"] is None and none.summary["first_token_attention_max"] is None
    assert none.summary["has_artifacts"] is None and none.summary["notes"]


def test_first_token_attention_is_averaged_over_inputs():
    report = text_report([text_record(first_token=torch.tensor([0.2, 0.4, 0.6])), text_record(first_token=torch.tensor([0.4, 0.6, float("nan")]))])
    assert [row["first_token_attention"] for row in report.layers] == pytest.approx([0.3, 0.5, 0.6])


def test_sink_epsilon_counts_heads_strictly_above_epsilon():
    alpha = torch.tensor([[0.3, 0.31, 0.1, 0.9], [0.0, 0.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0]])  # (L, H)
    measured = torch.tensor([0.1, 0.1, 0.1])
    report = text_report([text_record(alpha0=alpha, first_token=measured)], epsilon=0.3)
    assert [row["sink_epsilon"] for row in report.layers] == pytest.approx([0.5, 0.25, 1.0])
    assert report.summary["sink_epsilon"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    loose = text_report([text_record(alpha0=alpha, first_token=measured)], epsilon=0.05)
    assert loose.layers[1]["sink_epsilon"] == pytest.approx(0.25)
    assert loose.layers[0]["sink_epsilon"] == pytest.approx(1.0)


def test_massive_activations_are_an_artifact():
    record = text_record()
    record.massive = [{"layer": 1, "token": 0, "channel": 5, "value": 900.0}, {"layer": 2, "token": 0, "channel": 5, "value": -950.0}]
    report = text_report([record])
    assert report.massive_activations == [{"input": "text", **m} for m in record.massive]
    assert report.summary["has_massive_activations"] is True and report.summary["has_artifacts"] is True
    assert report.summary["massive_tokens"] == [("text", 0)]
    assert text_report([text_record()]).summary["has_massive_activations"] is False


def test_secondary_outliers_grouped_by_token_text():
    tokens = ["<s>", " the", "cat", " the", "sat", "on", " the", "mat"]
    a = text_record(tokens=tokens, outliers_at={1: {1: 4.0, 3: 6.0}, 2: {6: 5.0, 2: 3.5}})
    report = text_report([a])
    secondary = report.summary["secondary_outliers"]
    assert secondary[0] == {"text": " the", "count": 3, "layers": [1, 2], "max_ratio": 6.0}
    assert secondary[1] == {"text": "cat", "count": 1, "layers": [2], "max_ratio": 3.5}
    assert len(secondary) == 2


# -- the report object ----------------------------------------------------------------------------
def test_report_dict_carries_version_model_settings_and_inputs():
    report = vision_report([vision_record("a"), vision_record("b")], batch_size=3)
    data = report.to_dict()
    assert data["sinkless_version"] == __version__
    assert data["model"] == "hand-vit" and data["modality"] == "vision"
    assert data["settings"]["batch_size"] == 3 and data["settings"]["min_fraction"] == MIN_FRACTION
    assert data["inputs"] == [{"name": "a", "tokens": 17, "image_size": [56, 56]}, {"name": "b", "tokens": 17, "image_size": [56, 56]}]
    assert data["figures"] == [] and data["outliers"] == [] and data["massive_activations"] == []
    text = text_report([text_record(n=3, tokens=["a", "b", "c"])]).to_dict()
    assert text["inputs"] == [{
        "name": "text", "tokens": 3, "text_tokens": ["a", "b", "c"],
        "token_norms": [[1.0, 1.0, 1.0]] * 3, "token_norm_medians": [1.0, 1.0, 1.0],  # every token, every layer
    }]
    extra = build_report("m", "text", [text_record()], ScanSettings(), {"registers": {"top_k": 2}})
    assert extra.settings["registers"] == {"top_k": 2}
    report.extra["comparison"] = 1
    assert report.to_dict()["comparison"] == 1


def test_summary_lines_state_the_verdict_and_its_numbers():
    vision = vision_report([vision_record(outliers_at={1: {1: 9.0}, 2: {1: 9.0}})])
    lines = summary_lines(vision)
    assert lines[0] == "hand-vit (vision, 1 inputs): ARTIFACTS FOUND"
    assert "outlier tokens from layer 1 (layers 1-2), 6.25 % of patches, up to 9.0x the median norm" in lines[1]
    assert "on the border: 100 % (a random patch: 75 %)" in lines[2]
    clean = summary_lines(vision_report([vision_record()]))
    assert clean == ["hand-vit (vision, 1 inputs): no artifacts found",
                     "  max/median token norm at most 1.00x in any image and layer (typical image: 1.00x; outlier floor 3x)"]
    text = summary_lines(text_report([text_record(first_token=torch.tensor([0.1, 0.5, 0.6]))]))
    assert text[0] == "hand-lm (text, 1 inputs): ARTIFACTS FOUND"
    assert "first-token attention: mean 40 %, max 60 %; >= 30 % in layers 1-2" in text[1]


VISION_ROW_KEYS = {
    "layer", "norm_median", "norm_max", "max_ratio", "max_ratio_worst", "outlier_fraction", "outlier_threshold_median",
    "first_token_attention", "sink_epsilon", "outlier_attention_share", "outlier_attention_share_cls", "outlier_attention_share_patches",
}
SUMMARY_KEYS = {
    "has_artifacts", "first_outlier_layer", "outlier_layers", "peak_layer", "outlier_fraction", "max_ratio", "border_fraction",
    "border_fraction_expected", "corner_fraction", "neighbor_similarity", "sink_share", "n_inputs", "notes",
}


def test_report_schema_keys():
    report = vision_report([vision_record(outliers_at={1: {7: 9.0}, 2: {7: 9.0}})])
    data = report.to_dict()
    assert set(data) == {
        "sinkless_version", "model", "modality", "settings", "inputs", "layers", "outliers", "massive_activations", "summary", "figures", "figure_captions",
    }
    assert data["layers"] == report.layers and data["summary"] == report.summary
    assert all(set(row) == VISION_ROW_KEYS for row in report.layers)
    assert all(row[key] is None for row in report.layers for key in ("first_token_attention", "sink_epsilon", "outlier_attention_share_patches"))
    assert set(report.summary) == SUMMARY_KEYS | {"sink_share_cls"}
    text = text_report([text_record(first_token=torch.tensor([0.5, 0.5, 0.5]))]).summary
    assert set(text) == SUMMARY_KEYS | {
        "first_token_attention_max", "sink_epsilon", "has_first_token_sink", "has_massive_activations", "massive_tokens", "has_outliers", "secondary_outliers",
    }


def test_a_text_of_one_token_has_no_body_to_measure():
    report = text_report([text_record(n=1)])
    row = report.layers[0]
    assert row["norm_median"] is None and row["norm_max"] is None and row["max_ratio"] is None and row["max_ratio_worst"] is None
    assert row["outlier_fraction"] == 0.0
    assert report.summary["outlier_layers"] == [] and report.summary["max_ratio"] is None


def test_nan_values_are_left_out_of_medians():
    a, b, c = vision_record("a"), vision_record("b"), vision_record("c")
    a.thresholds = torch.tensor([float("nan")] * 3)
    b.thresholds = torch.tensor([4.0, 4.0, 4.0])
    report = vision_report([a, b, c])
    assert report.layers[0]["outlier_threshold_median"] == 3.0  # median of 4 and 3, the lower middle: NaN ignored
    a.thresholds = torch.tensor([float("nan")] * 3)
    assert vision_report([a]).layers[0]["outlier_threshold_median"] is None


def test_group_norm_ratios_divide_by_the_input_median():
    layout = TokenLayout(1 + 1 + 16, 1, 1, GRID)
    body = torch.zeros(18, dtype=torch.bool)
    body[2:] = True
    norms = torch.full((1, 18), 2.0)
    norms[0, 1] = 8.0
    record = InputRecord("r", layout, [0], body, norms, torch.tensor([6.0]), torch.zeros(1, 18, dtype=torch.bool), torch.tensor([2.0]), image_hw=(56, 56))
    assert vision_report([record]).layers[0]["registers_norm_ratio"] == 4.0


def test_text_outliers_without_decoded_tokens():
    record = text_record(outliers_at={1: {4: 5.0}, 2: {4: 5.0}})
    record.tokens = None
    report = text_report([record])
    assert [o["text"] for o in report.outliers] == [None, None]
    assert report.summary["secondary_outliers"] == [{"text": None, "count": 2, "layers": [1, 2], "max_ratio": 5.0}]


def test_first_token_sink_threshold_is_inclusive_in_exact_arithmetic():
    exact = text_report([text_record(first_token=torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64))])
    assert exact.summary["first_token_attention_max"] == 0.3 and exact.summary["has_first_token_sink"] is True


def test_corners_of_a_wide_grid_summed_over_inputs():
    """A 3 x 5 patch grid: corners (0, 0), (0, 4), (2, 0), (2, 4); two inputs add up."""
    def wide(name, patches):
        layout = TokenLayout(16, 1, 0, (3, 5))
        body = torch.zeros(16, dtype=torch.bool)
        body[1:] = True
        outliers = torch.zeros(2, 16, dtype=torch.bool)
        norms = torch.ones(2, 16)
        for p in patches:
            outliers[:, 1 + p] = True
            norms[:, 1 + p] = 9.0
        return InputRecord(name, layout, [0, 1], body, norms, torch.full((2,), 3.0), outliers, torch.ones(2), image_hw=(42, 70))

    # input a: (2, 4) corner, (1, 0) border, (1, 2) inside; input b: (0, 4) corner, (2, 0) corner, (2, 2) border
    report = vision_report([wide("a", [14, 5, 7]), wide("b", [4, 10, 12])])
    s = report.summary
    assert s["border_fraction"] == pytest.approx(5 / 6) and s["corner_fraction"] == pytest.approx(3 / 6)
    assert s["border_fraction_expected"] == pytest.approx(12 / 15)
    assert {(o["input"], o["row"], o["col"]) for o in report.outliers if o["layer"] == 0} == {
        ("a", 2, 4), ("a", 1, 0), ("a", 1, 2), ("b", 0, 4), ("b", 2, 0), ("b", 2, 2),
    }


def test_massive_tokens_sorted_by_input_then_token_and_capped():
    a, b = text_record(name="b-text"), text_record(name="a-text")
    a.massive = [{"layer": 0, "token": t, "channel": 1, "value": 500.0} for t in (5, 1)]
    b.massive = [{"layer": 1, "token": t, "channel": 2, "value": -500.0} for t in (7, 0, 7)]
    summary = text_report([a, b]).summary
    assert summary["massive_tokens"] == [("a-text", 0), ("a-text", 7), ("b-text", 1), ("b-text", 5)]
    many = text_record(n=80)
    many.massive = [{"layer": 0, "token": t, "channel": 0, "value": 300.0} for t in range(60)]
    assert text_report([many]).summary["massive_tokens"] == [("text", t) for t in range(50)]


def test_secondary_outliers_capped_at_twenty_and_ratios_below_one():
    tokens = [f"tok{i}" for i in range(30)]
    record = text_record(n=30, tokens=tokens, outliers_at={1: {t: 9.0 for t in range(1, 30)}})
    assert len(text_report([record]).summary["secondary_outliers"]) == 20
    low = text_record(tokens=[f"t{i}" for i in range(8)], outliers_at={1: {2: 0.5}})  # an absolute rule can flag a low norm
    assert text_report([low]).summary["secondary_outliers"][0]["max_ratio"] == 0.5


# -- what was measured: learned sinks, gates, alpha0 per head, notes and the null verdicts ------
TEXT_SUMMARY_KEYS = SUMMARY_KEYS | {
    "first_token_attention_max", "sink_epsilon", "has_first_token_sink", "has_massive_activations", "massive_tokens", "has_outliers", "secondary_outliers",
}


def test_learned_sink_and_attention_gate_rows_are_means_over_inputs():
    a = vision_record("a", learned_sink=torch.tensor([0.1, 0.2, 0.3]), attention_gate=torch.tensor([0.5, 0.6, float("nan")]))
    b = vision_record("b", learned_sink=torch.tensor([0.3, 0.4, 0.5]), attention_gate=torch.tensor([0.7, 0.8, 0.9]))
    rows = vision_report([a, b]).layers
    assert [row["learned_sink_attention"] for row in rows] == pytest.approx([0.2, 0.3, 0.4])
    assert [row["attention_gate"] for row in rows] == pytest.approx([0.6, 0.7, 0.9])  # NaN left out
    plain = vision_report([vision_record()]).layers[0]
    assert "learned_sink_attention" not in plain and "attention_gate" not in plain


def test_alpha0_per_head_is_the_mean_over_inputs_and_null_when_unmeasured():
    nan = float("nan")
    a0 = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [nan, nan, nan]])
    a1 = torch.tensor([[0.3, 0.4, 0.5], [0.6, 0.7, 0.8], [nan, nan, nan]])
    ft = torch.tensor([0.5, 0.5, nan])
    report = text_report([text_record(name="a", first_token=ft, alpha0=a0), text_record(name="b", first_token=ft, alpha0=a1)])
    assert report.layers[0]["alpha0_per_head"] == pytest.approx([0.2, 0.3, 0.4])
    assert report.layers[1]["alpha0_per_head"] == pytest.approx([0.5, 0.6, 0.7])
    assert report.layers[2]["alpha0_per_head"] == [None, None, None]  # NaN is written as null
    assert report.layers[2]["sink_epsilon"] is None  # no head measured at that layer
    assert report.layers[0]["sink_epsilon"] == pytest.approx(2 / 6)  # 0.4, 0.5 > 0.3 of six heads
    assert text_report([text_record()]).layers[0]["alpha0_per_head"] is None


def test_a_single_corner_outlier_is_all_corner():
    # patch (0, 0) only: a corner; (0, 1) only: border, not corner
    s = vision_report([vision_record(outliers_at={1: {1: 9.0}, 2: {1: 9.0}})]).summary
    assert s["corner_fraction"] == 1.0 and s["border_fraction"] == 1.0
    s = vision_report([vision_record(outliers_at={1: {2: 9.0}, 2: {2: 9.0}})]).summary
    assert s["corner_fraction"] == 0.0 and s["border_fraction"] == 1.0


def test_vision_without_attention_has_no_sink_share():
    shares = dict(share_cls=torch.tensor([0.1, 0.2, 0.6]), share_body=torch.tensor([0.3, 0.4, 0.5]), share_all=torch.tensor([0.05, 0.25, 0.45]))
    record = vision_record(outliers_at={1: {7: 9.0}, 2: {7: 9.0}}, **shares)
    off = vision_report([record], attention=False).summary
    assert off["sink_share"] is None and off["sink_share_cls"] is None
    assert off["notes"] == ["attention not measured (--no-attention): the share of attention outliers draw is unknown"]
    assert set(off) == SUMMARY_KEYS | {"sink_share_cls"}
    on = vision_report([record]).summary
    assert on["sink_share"] == pytest.approx(0.45) and on["notes"] == []


def test_text_without_attention_gives_no_sink_verdict():
    high = torch.tensor([0.9, 0.9, 0.9])
    off = text_report([text_record(first_token=high)], attention=False).summary
    assert off["notes"] == ["first-token attention not measured (--no-attention)"]
    assert off["sink_share"] is None and off["first_token_attention_max"] is None and off["sink_epsilon"] is None
    assert off["has_first_token_sink"] is None and off["has_artifacts"] is None
    assert set(off) == TEXT_SUMMARY_KEYS
    on = text_report([text_record(first_token=high)]).summary
    assert on["notes"] == [] and on["has_first_token_sink"] is True and on["has_artifacts"] is True


def test_texts_too_short_for_first_token_attention():
    nan = torch.full((3,), float("nan"))
    short = text_report([text_record(first_token=nan), text_record(first_token=nan)], warmup=4).summary
    assert short["notes"] == ["first-token attention not measured: every text is too short (it needs at least 5 tokens)"]
    assert short["sink_share"] is None and short["has_first_token_sink"] is None and short["has_artifacts"] is None
    low = torch.tensor([0.05, 0.05, 0.05])
    one = text_report([text_record(first_token=low)]).summary
    assert one["notes"] == [] and one["has_artifacts"] is False  # everything measured, nothing found
    assert set(one) == TEXT_SUMMARY_KEYS
    part = text_report([text_record(first_token=low), text_record(first_token=nan), text_record(first_token=low)], warmup=6).summary
    assert part["notes"] == ["first-token attention from the 2 of 3 texts of at least 7 tokens"]
    assert part["sink_share"] == pytest.approx(0.05) and part["has_artifacts"] is False
    half = text_report([text_record(first_token=low), text_record(first_token=nan)]).summary
    assert half["notes"] == ["first-token attention from the 1 of 2 texts of at least 5 tokens"]


def test_texts_of_one_token_leave_outliers_unmeasured():
    s = text_report([text_record(n=1, first_token=torch.full((3,), float("nan")))]).summary
    assert s["has_outliers"] is None and s["has_artifacts"] is None
    assert s["notes"][-1] == "outlier tokens not measured: no text has a token after its first"
    assert set(s) == TEXT_SUMMARY_KEYS
