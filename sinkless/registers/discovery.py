"""Finding register neurons (Jiang et al. 2025, §3): MLP units whose activation concentrates on outlier tokens.

One pass over the discovery inputs records every layer's token norms and MLP hidden activations.
For each candidate detection layer d, each image with outliers at d adds, for every (layer, neuron),
the mean |activation| over its outlier positions; scores are averaged over those images. Neurons are
ranked jointly over the layers up to where outliers first appear. ``top_k`` is, by default, the
smallest k of a sweep whose registers remove the outliers on held-out inputs.

Shapes: B batch, N tokens, W MLP width, L layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from sinkless.adapters import Modality, TokenLayout
from sinkless.hooks import hooks
from sinkless.registers.ttr import RegisterNeurons, TestTimeRegisters, _extreme
from sinkless.scan import ScanSettings
from sinkless.scan import measure as measure_inputs
from sinkless.scan.inputs import ImageInput, TextInput
from sinkless.scan.measure import body_tokens
from sinkless.scan.measure import model_inputs
from sinkless.scan.norms import OutlierRule, thresholds
from sinkless.scan.report import MIN_FRACTION, build_report
from sinkless.zoo import Loaded

__all__ = ["discover", "DiscoverySettings", "SWEEP"]

log = logging.getLogger(__name__)

SWEEP = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
"""Values of top_k tried, in order, when top_k is automatic."""


@dataclass(frozen=True)
class DiscoverySettings:
    rule: OutlierRule = OutlierRule()
    detection_layer: int | None = None  # default: the layer with the most outliers
    highest_layer: int | None = None  # default: the first layer with outliers
    top_k: int | None = None  # default: the sweep
    max_k: int = 64
    sparsity: bool = False  # keep a neuron only if |activation| < 0.5 on at least half of all tokens
    batch_size: int = 8
    n_registers: int = 1
    max_tokens: int = 512

    def scan_settings(self) -> ScanSettings:
        return ScanSettings(rule=self.rule, batch_size=self.batch_size, max_tokens=self.max_tokens, attention=False)


@dataclass
class _Tally:
    """Running sums over the discovery inputs."""

    n_layers: int
    width: int

    def __post_init__(self) -> None:
        L, W = self.n_layers, self.width
        self.score_sum = torch.zeros(L, L, W, dtype=torch.float64)  # [detection layer, layer, neuron]
        self.images = torch.zeros(L, dtype=torch.long)  # images with outliers, per detection layer
        self.outliers = torch.zeros(L, dtype=torch.long)
        self.n_body = 0
        self.quiet = torch.zeros(L, W, dtype=torch.float64)  # tokens with |activation| < 0.5
        self.tokens = 0
        self.peak_sum = torch.zeros(L, W, dtype=torch.float64)  # per-input extreme (largest |a|, signed) over body tokens
        self.inputs = 0


def _layouts(loaded: Loaded, n_tokens: int, lengths: list, image_hw) -> list[TokenLayout]:
    """One layout per input: the padded batch width for images, each text's own length for text."""
    if loaded.modality is Modality.VISION:
        return [loaded.adapter.layout(loaded.model, n_tokens, image_hw)] * len(lengths)
    return [TokenLayout(n, loaded.adapter.n_cls) for n in lengths]


@torch.no_grad()
def _tally(loaded: Loaded, inputs, settings: DiscoverySettings, progress: bool) -> _Tally:
    adapter, model = loaded.adapter, loaded.model
    n_layers = adapter.num_layers(model)
    tally = _Tally(n_layers, adapter.mlp_width(model))
    scan_settings = settings.scan_settings()
    norm = lambda t: t.float().norm(dim=-1)  # noqa: E731
    capture = {adapter.residual_site(l): norm for l in range(n_layers)}
    capture.update({adapter.mlp_hidden_site(l): None for l in range(n_layers)})
    for start in tqdm(range(0, len(inputs), settings.batch_size), desc="finding register neurons", disable=not progress):
        batch = inputs[start : start + settings.batch_size]
        kwargs, lengths, image_hw, _ = model_inputs(loaded, batch, scan_settings)
        with hooks(model, capture=capture) as rec:
            model(**kwargs)
        norms = torch.stack([rec[adapter.residual_site(l)] for l in range(n_layers)], 1).cpu()  # (B, L, N)
        layouts = _layouts(loaded, norms.shape[-1], lengths, image_hw)
        for i, layout in enumerate(layouts):
            n = layout.n_tokens
            body = body_tokens(layout, text=loaded.modality is Modality.TEXT)
            tau = thresholds(norms[i, :, :n], settings.rule, body.expand(n_layers, n))  # (L,)
            flagged = (norms[i, :, :n] > tau[:, None]) & body  # (L, N)
            tally.outliers += flagged.sum(-1)
            tally.n_body += int(body.sum())
            signed = [rec[adapter.mlp_hidden_site(l)][i, :n].double().cpu() for l in range(n_layers)]  # L x (N, W)
            hidden = [h.abs() for h in signed]
            for l in range(n_layers):
                tally.quiet[l] += (hidden[l] < 0.5).sum(0)
                tally.peak_sum[l] += _extreme(signed[l][body], dim=0)
            tally.tokens += n
            tally.inputs += 1
            for d in flagged.any(-1).nonzero().flatten().tolist():
                positions = flagged[d]
                tally.images[d] += 1
                for l in range(n_layers):
                    tally.score_sum[d, l] += hidden[l][positions].mean(0)
    return tally


def _outlier_count(loaded: Loaded, inputs, settings: DiscoverySettings, intervention=None) -> dict:
    records = measure_inputs(loaded, inputs, settings.scan_settings(), intervention=intervention, progress=False)
    report = build_report(loaded.name, loaded.modality.value, records, settings.scan_settings())
    per_layer = {row["layer"]: int(sum(int(r.outliers[i].sum()) for r in records)) for i, row in enumerate(report.layers)}
    return {
        "outlier_tokens": sum(per_layer.values()),
        "outlier_layers": report.summary["outlier_layers"],
        "max_ratio": report.summary["max_ratio"],
        "has_artifacts": report.summary["has_artifacts"] if loaded.modality is Modality.VISION else bool(report.summary["outlier_layers"]),
        "per_layer": per_layer,
    }


def discover(
    loaded: Loaded,
    inputs: Sequence[ImageInput] | Sequence[TextInput],
    heldout: Sequence[ImageInput] | Sequence[TextInput],
    settings: DiscoverySettings = DiscoverySettings(),
    *,
    progress: bool = True,
) -> RegisterNeurons:
    """Find ``loaded``'s register neurons on ``inputs``; choose and check top_k on ``heldout``."""
    tally = _tally(loaded, inputs, settings, progress)
    fractions = [tally.outliers[l].item() / max(tally.n_body, 1) for l in range(tally.n_layers)]
    with_outliers = [l for l, f in enumerate(fractions) if f >= MIN_FRACTION]
    base = RegisterNeurons(
        model=loaded.name,
        neurons=[],
        threshold=settings.rule.absolute,
        rule=settings.rule.to_dict(),
        settings={
            "n_inputs": len(inputs),
            "n_heldout": len(heldout),
            "sparsity_filter": settings.sparsity,
            "max_k": settings.max_k,
            "n_registers": settings.n_registers,
            "outlier_fraction_per_layer": fractions,
        },
    )
    if not with_outliers:
        log.info("no outlier tokens in %d inputs: nothing to fix", len(inputs))
        base.heldout = {"before": _outlier_count(loaded, heldout, settings)} if heldout else {}
        base.heldout["after"] = base.heldout.get("before")
        return base

    detection = settings.detection_layer if settings.detection_layer is not None else max(with_outliers, key=lambda l: fractions[l])
    highest = settings.highest_layer if settings.highest_layer is not None else with_outliers[0]
    if tally.images[detection] == 0:
        raise ValueError(f"no input has outliers at detection layer {detection}")
    scores = (tally.score_sum[detection] / tally.images[detection]).float()  # (L, W)
    scores[highest + 1 :] = float("-inf")
    if settings.sparsity:
        quiet_share = tally.quiet / tally.tokens
        scores[quiet_share < 0.5] = float("-inf")
    order = scores.flatten().argsort(descending=True)[: settings.max_k]
    width = scores.shape[1]
    peaks = (tally.peak_sum / max(tally.inputs, 1)).float()
    ranked = [
        {"layer": int(i // width), "neuron": int(i % width), "score": float(scores.flatten()[i]), "peak": float(peaks[i // width, i % width])}
        for i in order
        if torch.isfinite(scores.flatten()[i])
    ]
    found = replace(base, neurons=ranked, detection_layer=detection, highest_layer=highest)

    before = _outlier_count(loaded, heldout, settings)
    if settings.top_k is not None:
        chosen = min(settings.top_k, len(ranked))
        sweep = []
    else:
        sweep, chosen = [], None
        for k in (k for k in SWEEP if k <= len(ranked)):
            ttr = TestTimeRegisters(loaded, found.with_top_k(k), n_registers=settings.n_registers)
            after = _outlier_count(loaded, heldout, settings, intervention=ttr)
            sweep.append({"k": k, "outlier_tokens": after["outlier_tokens"], "max_ratio": after["max_ratio"], "has_artifacts": after["has_artifacts"]})
            log.info("top_k %d: %d outlier tokens on held-out inputs (before: %d)", k, after["outlier_tokens"], before["outlier_tokens"])
            if not after["has_artifacts"]:
                chosen = k
                break
        if chosen is None:
            chosen = min(settings.max_k, len(ranked))
            log.warning("no top_k up to %d removes the outliers on held-out inputs; keeping %d", chosen, chosen)
    found = found.with_top_k(chosen)
    found.sweep = sweep
    after = _outlier_count(loaded, heldout, settings, intervention=TestTimeRegisters(loaded, found, n_registers=settings.n_registers))
    found.heldout = {"before": before, "after": after}
    return found
