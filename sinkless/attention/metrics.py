"""Sink metrics of a model whatever its attention: first-token share, Sink_ε, activations, outlier tokens.

``sinkless.scan`` reads attention probabilities from eager attention, which a sigmoid or sink-logit
model does not have. Here the norms, outlier tokens and massive activations come from the scan itself
(``measure`` with attention off, then ``build_report``), and the attention metrics from the converted
model's own weights (``attention_probabilities``), put into the same records so the report's
``first_token_attention`` and ``sink_epsilon`` follow the scan's definitions (Xiao et al. 2024;
Gu et al. 2025: α₀ = mean over queries of the weight on the first token, Sink_ε = share of
(input, head) with α₀ > ε).

What "attention share" means per variant: the fraction of a query row's total attention weight that
lands on a key. Softmax and gated rows sum to 1, so it is the probability itself. Sink-logit rows sum to
1 − (the learned sink's share): the share of token 0 is its probability, the rest having gone to the
sink logit, which is no token. Sigmoid and unnormalised ELU+1 rows have any positive sum, so a row is
divided by its sum first: the share is "how much of what this query reads comes from token 0". The
raw mean sigmoid weight on token 0 is reported beside it (``first_token_weight``).

Shapes: B inputs, H heads, N tokens, D width, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from sinkless.adapters import Modality
from sinkless.attention.convert import attention_probabilities, converted_spec
from sinkless.hooks import hooks
from sinkless.scan import ScanSettings
from sinkless.scan import measure as scan_measure
from sinkless.scan.measure import first_token as first_token_index
from sinkless.scan.measure import model_inputs
from sinkless.scan.report import build_report
from sinkless.zoo import Loaded

__all__ = ["sink_metrics", "UNNORMALISED"]

UNNORMALISED = ("sigmoid", "elu1")
"""Variants whose rows do not sum to 1: their attention share divides each row by its sum."""


def _share(probs: torch.Tensor, variant: str) -> torch.Tensor:
    """(H, N, N) weights -> attention shares (rows of unnormalised variants divided by their sum)."""
    if variant in UNNORMALISED:
        return probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    return probs


@torch.no_grad()
def sink_metrics(loaded: Loaded, inputs: Sequence, settings: ScanSettings = ScanSettings(), *, progress: bool = False) -> dict:
    """The scan report of ``loaded`` on ``inputs`` plus a flat summary of the sink metrics (``metrics``).

    ``loaded.model`` must be converted (``convert(model, "softmax")`` for a plain softmax model: exact).
    """
    model, adapter = loaded.model, loaded.adapter
    spec = converted_spec(model)
    if spec is None:
        raise ValueError("sink_metrics needs a converted model (convert(model, 'softmax') is exact)")
    was_training = model.training
    model.eval()
    try:
        plain = dataclasses.replace(settings, attention=False)
        records = scan_measure(loaded, inputs, plain, progress=progress)
        vision = loaded.modality is Modality.VISION
        layers = list(records[0].layers)
        sites = {layer: adapter.attention_site(layer) for layer in layers}
        residual = {layer: adapter.residual_site(layer) for layer in layers}
        peaks = {layer: [] for layer in layers}  # per input: (max |a|, median |a|)
        raw_first = {layer: [] for layer in layers}
        k = 0
        for start in range(0, len(inputs), settings.batch_size):
            batch = inputs[start : start + settings.batch_size]
            kwargs, lengths, _, _ = model_inputs(loaded, batch, settings)
            capture = {**{s: None for s in sites.values()}, **{s: None for s in residual.values()}}
            with attention_probabilities(model), hooks(model, capture=capture) as rec:
                model(**kwargs)
            for i in range(len(batch)):
                record = records[k]
                k += 1
                n = record.layout.n_tokens
                first = first_token_index(record.layout)
                warm = first + 1 if vision else min(first + settings.warmup, n - 1)
                shares, alphas = [], []
                for layer in layers:
                    probs = rec[sites[layer]][i, :, :n, :n].float()  # (H, n, n)
                    share = _share(probs, spec.variant)
                    shares.append(share[:, warm:, first].mean())
                    alphas.append(share[:, first:, first].mean(-1))  # (H,)
                    raw_first[layer].append(float(probs[:, warm:, first].mean()))
                    act = rec[residual[layer]][i, : (n if lengths[i] is None else lengths[i])].float().abs()  # (n, D)
                    peaks[layer].append((float(act.max()), float(act.median())))
                record.first_token = torch.stack(shares)  # (L,)
                record.alpha0 = torch.stack(alphas)  # (L, H)
        report = build_report(loaded.name, loaded.modality.value, records, settings, {"attention": spec.to_dict()})
    finally:
        model.train(was_training)
    return {"report": report.to_dict(), "metrics": _flat(report.to_dict(), peaks, raw_first, spec.variant)}


def _flat(report: dict, peaks: dict, raw_first: dict, variant: str) -> dict:
    """The numbers compare-attn tabulates: per-layer lists and a few maxima."""
    rows = report["layers"]
    first = [row["first_token_attention"] for row in rows]
    eps = [row["sink_epsilon"] for row in rows]
    per_layer_max = [max(m for m, _ in peaks[row["layer"]]) for row in rows]
    per_layer_median = [sorted(md for _, md in peaks[row["layer"]])[len(peaks[row["layer"]]) // 2] for row in rows]
    top = max(range(len(rows)), key=lambda i: per_layer_max[i])
    kept = [v for v in eps if v is not None]
    return {
        "variant": variant,
        "layers": [row["layer"] for row in rows],
        "first_token_attention": first,
        "first_token_attention_max": max((v for v in first if v is not None), default=None),
        "first_token_weight": [sum(v) / len(v) for v in raw_first.values()] if variant in UNNORMALISED else None,
        "sink_epsilon": eps,
        "sink_epsilon_mean": sum(kept) / len(kept) if kept else None,
        "max_activation": per_layer_max[top],
        "max_activation_layer": rows[top]["layer"],
        "max_activation_median": per_layer_median[top],
        "max_activation_ratio": per_layer_max[top] / per_layer_median[top] if per_layer_median[top] > 0 else math.inf,
        "max_activation_per_layer": per_layer_max,
        "outlier_tokens": len(report["outliers"]),
        "outlier_fraction": report["summary"]["outlier_fraction"],
        "max_norm_ratio": report["summary"]["max_ratio"],
        "massive_activations": len(report["massive_activations"]),
        "has_first_token_sink": bool(first) and max((v or 0) for v in first) >= 0.3,
    }
