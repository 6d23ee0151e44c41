"""Aggregate per-input measurements into the scan report (the JSON schema documented in the README)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sinkless._version import __version__
from sinkless.patches import border_mask, grid_positions
from sinkless.scan.measure import InputRecord, ScanSettings

__all__ = ["Report", "build_report", "MIN_FRACTION"]

MIN_FRACTION = 0.002
"""A layer 'has outliers' when at least this share of its body tokens are outliers (0.2 %)."""


def _nanmean(values: list[float]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _median(values: list[float]) -> float | None:
    kept = sorted(v for v in values if v is not None and not math.isnan(v))
    return float(torch.tensor(kept).median()) if kept else None


@dataclass
class Report:
    """A scan's results; ``to_dict()`` is ``report.json``."""

    model: str
    modality: str
    settings: dict
    inputs: list[dict]
    layers: list[dict]
    outliers: list[dict]
    massive_activations: list[dict]
    summary: dict
    figures: list[str] = field(default_factory=list)
    figure_captions: dict[str, str] = field(default_factory=dict)  # PNG name -> what it shows
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "sinkless_version": __version__,
            "model": self.model,
            "modality": self.modality,
            "settings": self.settings,
            "inputs": self.inputs,
            "layers": self.layers,
            "outliers": self.outliers,
            "massive_activations": self.massive_activations,
            "summary": self.summary,
            "figures": self.figures,
            "figure_captions": self.figure_captions,
            **self.extra,
        }


def _layer_rows(records: list[InputRecord], vision: bool) -> list[dict]:
    layers = records[0].layers
    rows = []
    for li, layer in enumerate(layers):
        body_norms = torch.cat([r.norms[li][r.body] for r in records])
        ratios = []
        n_out = n_body = 0
        for r in records:
            body = r.norms[li][r.body]
            if len(body):
                ratios.append(float(body.max() / r.medians[li]))
            n_out += int(r.outliers[li].sum())
            n_body += len(body)
        row = {
            "layer": layer,
            "norm_median": float(body_norms.median()) if len(body_norms) else None,
            "norm_max": float(body_norms.max()) if len(body_norms) else None,
            "max_ratio": _median(ratios),
            "max_ratio_worst": max(ratios) if ratios else None,
            "outlier_fraction": n_out / n_body if n_body else 0.0,
            "outlier_threshold_median": _median([float(r.thresholds[li]) for r in records]),
            "first_token_attention": None,
            "sink_epsilon": None,
            "outlier_attention_share": None,
            "outlier_attention_share_cls": None,
            "outlier_attention_share_patches": None,
        }
        if records[0].share_all is not None:
            row["outlier_attention_share"] = _nanmean([float(r.share_all[li]) for r in records])
            if vision:
                row["outlier_attention_share_cls"] = _nanmean([float(r.share_cls[li]) for r in records])
                row["outlier_attention_share_patches"] = _nanmean([float(r.share_body[li]) for r in records])
        if records[0].first_token is not None:
            row["first_token_attention"] = _nanmean([float(r.first_token[li]) for r in records])
        for group in ("registers", "appended"):
            ratios = [
                float(getattr_slice(r, group, li).median() / r.medians[li])
                for r in records
                if getattr_slice(r, group, li).numel()
            ]
            if ratios:
                row[f"{group}_norm_ratio"] = _median(ratios)
        rows.append(row)
    return rows


def getattr_slice(record: InputRecord, group: str, li: int) -> torch.Tensor:
    """Norms of a named token group of one input at scanned-layer index ``li``."""
    return record.norms[li][getattr(record.layout, group)]


def build_report(
    model: str, modality: str, records: list[InputRecord], settings: ScanSettings, extra_settings: dict | None = None
) -> Report:
    vision = modality == "vision"
    layers = _layer_rows(records, vision)
    if records[0].alpha0 is not None:
        for li, row in enumerate(layers):
            alphas = torch.cat([r.alpha0[li] for r in records])
            row["sink_epsilon"] = float((alphas > settings.epsilon).float().mean())

    outliers = []
    for r in records:
        rows, cols = grid_positions(r.layout.grid) if vision else (None, None)
        start = r.layout.body.start
        for li, layer in enumerate(r.layers):
            for token in r.outliers[li].nonzero().flatten().tolist():
                entry = {
                    "input": r.name,
                    "layer": layer,
                    "token": token,
                    "norm": float(r.norms[li, token]),
                    "ratio": float(r.norms[li, token] / r.medians[li]),
                }
                if vision:
                    entry["row"] = int(rows[token - start])
                    entry["col"] = int(cols[token - start])
                else:
                    entry["text"] = r.tokens[token] if r.tokens else None
                outliers.append(entry)
    massive = [{"input": r.name, **m} for r in records for m in r.massive]

    summary = _summary(records, layers, outliers, massive, vision)
    inputs = [
        {"name": r.name, "tokens": r.layout.n_tokens, **({"image_size": list(r.image_hw)} if vision else {"text_tokens": r.tokens})}
        for r in records
    ]
    if not vision:
        _add_text_arrays(records, layers, inputs)
    return Report(
        model=model,
        modality=modality,
        settings={**settings.to_dict(), "min_fraction": MIN_FRACTION, **(extra_settings or {})},
        inputs=inputs,
        layers=layers,
        outliers=outliers,
        massive_activations=massive,
        summary=summary,
    )


def _rounded(values: torch.Tensor) -> list:
    """Floats to 5 significant digits: per-token arrays stay readable and small in the JSON."""
    return [float(f"{v:.5g}") if math.isfinite(v) else None for v in values.tolist()]


def _add_text_arrays(records: list[InputRecord], layers: list[dict], inputs: list[dict]) -> None:
    """Text: per-token norms per input and first-token attention per head per layer (new fields, README schema).

    ``inputs[i]["token_norms"]``: (L, n) residual-stream norm of every token at every scanned layer
    (token 0 included, unlike the body statistics); ``token_norm_medians``: (L,) its body median.
    ``layers[l]["alpha0_per_head"]``: (H,) mean over inputs of alpha_0 (Gu et al.), the mean attention
    every later query gives the first token, per head; null when attention was not measured.
    """
    for entry, r in zip(inputs, records):
        entry["token_norms"] = [_rounded(row) for row in r.norms]  # L x (n,)
        entry["token_norm_medians"] = _rounded(r.medians)  # (L,)
    measured = [r.alpha0 for r in records if r.alpha0 is not None]
    for li, row in enumerate(layers):
        row["alpha0_per_head"] = _rounded(torch.stack([a[li] for a in measured]).mean(0)) if measured else None  # (H,)


def _summary(records, layers, outliers, massive, vision: bool) -> dict:
    outlier_layers = [row["layer"] for row in layers if row["outlier_fraction"] >= MIN_FRACTION]
    persistent = len(outlier_layers) >= min(2, len(layers))
    first = outlier_layers[0] if outlier_layers else None
    peak_row = max(layers, key=lambda row: row["outlier_fraction"])
    peak = peak_row["layer"] if outlier_layers else None
    summary = {
        "has_artifacts": False,
        "first_outlier_layer": first,
        "outlier_layers": outlier_layers,
        "peak_layer": peak,
        "outlier_fraction": _nanmean([row["outlier_fraction"] for row in layers if row["layer"] in outlier_layers]) or 0.0,
        "max_ratio": max((row["max_ratio"] for row in layers if row["max_ratio"] is not None), default=None),
        "border_fraction": None,
        "border_fraction_expected": None,
        "corner_fraction": None,
        "neighbor_similarity": None,
        "sink_share": None,
        "n_inputs": len(records),
    }
    if vision:
        summary["has_artifacts"] = bool(outlier_layers) and persistent
        grid = records[0].layout.grid
        ring = border_mask(grid)
        summary["border_fraction_expected"] = float(ring.float().mean())
        if peak is not None:
            li = records[0].layers.index(peak)
            on_border = on_corner = total = 0
            ns_out, ns_other = [], []
            for r in records:
                body = r.outliers[li][r.layout.body]  # (P,) bool over the patch grid
                rows, cols = grid_positions(r.layout.grid)
                corner = ((rows == 0) | (rows == r.layout.grid[0] - 1)) & ((cols == 0) | (cols == r.layout.grid[1] - 1))
                on_border += int((body & border_mask(r.layout.grid)).sum())
                on_corner += int((body & corner).sum())
                total += int(body.sum())
                if r.neighbor_similarity is not None:
                    ns_out.extend(r.neighbor_similarity[body].tolist())
                    ns_other.extend(r.neighbor_similarity[~body].tolist())
            summary["border_fraction"] = on_border / total if total else None
            summary["corner_fraction"] = on_corner / total if total else None
            summary["neighbor_similarity"] = {"outliers": _nanmean(ns_out), "others": _nanmean(ns_other)}
        shares = [row["outlier_attention_share"] for row in layers if first is not None and row["layer"] > first]
        summary["sink_share"] = _nanmean(shares)
        summary["sink_share_cls"] = _nanmean([row["outlier_attention_share_cls"] for row in layers if first is not None and row["layer"] > first])
    else:
        first_token = [row["first_token_attention"] for row in layers if row["first_token_attention"] is not None]
        eps = [row["sink_epsilon"] for row in layers if row["sink_epsilon"] is not None]
        summary["sink_share"] = _nanmean(first_token)
        summary["first_token_attention_max"] = max(first_token) if first_token else None
        summary["sink_epsilon"] = _nanmean(eps)
        summary["has_first_token_sink"] = bool(first_token) and max(first_token) >= 0.3
        summary["has_massive_activations"] = bool(massive)
        summary["massive_tokens"] = sorted({(m["input"], m["token"]) for m in massive}, key=lambda x: (x[0], x[1]))[:50]
        summary["has_outliers"] = bool(outlier_layers) and persistent
        summary["has_artifacts"] = summary["has_first_token_sink"] or summary["has_massive_activations"] or summary["has_outliers"]
        words: dict[str, dict] = {}
        for entry in outliers:
            info = words.setdefault(entry["text"], {"text": entry["text"], "count": 0, "layers": set(), "max_ratio": 0.0})
            info["count"] += 1
            info["layers"].add(entry["layer"])
            info["max_ratio"] = max(info["max_ratio"], entry["ratio"])
        summary["secondary_outliers"] = sorted(
            ({**w, "layers": sorted(w["layers"])} for w in words.values()), key=lambda w: -w["count"]
        )[:20]
    return summary
