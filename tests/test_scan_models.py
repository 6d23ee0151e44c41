"""`sinkless scan` on the bundled real models: the numbers the scan issue's acceptance asks for."""

from __future__ import annotations

import pytest

from sinkless.adapters import Modality
from sinkless.scan import ScanSettings, scan
from sinkless.scan.inputs import resolve_inputs

pytestmark = pytest.mark.slow


def test_focus_is_a_negative_control(focus):
    report, _ = scan(focus, resolve_inputs([], [], Modality.VISION), ScanSettings(), progress=False)
    print("dinov2-s-focus max/median:", report.summary["max_ratio"])
    assert report.summary["has_artifacts"] is False
    assert report.summary["max_ratio"] < 3


def test_smollm2_sinks_massive_and_the(smollm2):
    report, _ = scan(smollm2, resolve_inputs([], [], Modality.TEXT), ScanSettings(), progress=False)
    late = [row["first_token_attention"] for row in report.layers if row["layer"] >= 12]
    print(f"first-token attention, layers >= 12: min {min(late):.3f}")
    assert min(late) >= 0.3
    assert report.massive_activations and {m["token"] for m in report.massive_activations} == {0}
    the = [s for s in report.summary["secondary_outliers"] if s["text"] == " the"]
    print("secondary outliers:", report.summary["secondary_outliers"])
    assert the and {3, 4, 5, 6, 7, 8} <= set(the[0]["layers"])


def test_minilm_cls_sink_share(minilm):
    texts = resolve_inputs([], ["The quick brown fox jumps over the lazy dog near the river bank."], Modality.TEXT)
    report, _ = scan(minilm, texts, ScanSettings(), progress=False)
    shares = [row["first_token_attention"] for row in report.layers]
    print("minilm CLS attention share per layer:", [round(s, 3) for s in shares], "sink_share", report.summary["sink_share"])
    assert all(0 <= s <= 1 for s in shares) and report.summary["sink_share"] is not None
