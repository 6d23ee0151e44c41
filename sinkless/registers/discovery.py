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
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from sinkless import distributed
from sinkless.adapters import Modality, TokenLayout
from sinkless.errors import SinklessError
from sinkless.hooks import hooks
from sinkless.registers.ttr import RegisterNeurons, TestTimeRegisters
from sinkless.scan import ScanSettings
from sinkless.scan import measure as measure_inputs
from sinkless.scan.inputs import ImageInput, TextInput
from sinkless.scan.measure import body_tokens, model_inputs, to_model
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

    def __post_init__(self) -> None:
        for name in ("max_k", "batch_size", "n_registers", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SinklessError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise SinklessError(f"top_k must be a whole number >= 1, got {self.top_k!r}", fix="pass --top-k K with K >= 1, or leave it out for the sweep")
        if self.rule.absolute is not None and not (math.isfinite(self.rule.absolute) and 0 < self.rule.absolute < 3.4e38):
            raise SinklessError(f"the outlier threshold must be a positive number, got {self.rule.absolute}")

    def scan_settings(self) -> ScanSettings:
        return ScanSettings(rule=self.rule, batch_size=self.batch_size, max_tokens=self.max_tokens, attention=False)


@dataclass
class _Tally:
    """Running sums over the discovery inputs. Scores are summed only once the detection layer is known,
    from the activations kept at the tokens that are outliers in some layer (a few % of all tokens)."""

    n_layers: int
    width: int

    def __post_init__(self) -> None:
        L, W = self.n_layers, self.width
        self.images = torch.zeros(L, dtype=torch.long)  # images with outliers, per detection layer
        self.outliers = torch.zeros(L, dtype=torch.long)
        self.n_body = 0
        self.quiet = torch.zeros(L, W, dtype=torch.float64)  # tokens with |activation| < 0.5 (with the sparsity filter)
        self.tokens = 0
        self.peak_sum = torch.zeros(L, W, dtype=torch.float64)  # per-input extreme (largest |a|, signed) over body tokens
        self.inputs = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # per input with outliers: (flagged (L, F) bool, |a| (L, F, W))

    def scores(self, detection: int) -> torch.Tensor:
        """(L, W) float64: for each (layer, neuron), the mean over inputs with outliers at ``detection``
        of its mean |activation| over those outlier positions."""
        total = torch.zeros(self.n_layers, self.width, dtype=torch.float64)
        for flagged, hidden in self.kept:
            positions = flagged[detection]
            if positions.any():
                total += hidden[:, positions].double().mean(1)  # (L, W)
        distributed.all_sum(total)  # each process kept its own inputs' activations
        return total / self.images[detection]


def _layouts(loaded: Loaded, n_tokens: int, lengths: list, image_hw) -> list[TokenLayout]:
    """One layout per input: the padded batch width for images, each text's own length for text."""
    if loaded.modality is Modality.VISION:  # image_hw: one size for the batch, or one per input
        sizes = image_hw if isinstance(image_hw, list) else [image_hw] * len(lengths)
        return [loaded.adapter.layout(loaded.model, n_tokens, hw) for hw in sizes]
    return [TokenLayout(n, loaded.adapter.n_cls) for n in lengths]


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.float().norm(dim=-1)


def _signed_extremes(hidden: torch.Tensor) -> torch.Tensor:
    """(T, W) -> (W,): each neuron's signed value of largest magnitude over the T tokens, as ``_extreme`` gives,
    from one max and one min instead of an |a| copy and an argmax (the discovery pass's hottest reduction).
    A tie of +v and -v keeps +v."""
    high, low = hidden.amax(0), hidden.amin(0)  # (W,)
    return torch.where(high >= -low, high, low)


def _as_slice(mask: torch.Tensor) -> slice | torch.Tensor:
    """A (N,) bool mask as the slice it is when its True entries are contiguous, else the mask itself."""
    where = mask.nonzero().flatten()
    if len(where) and int(where[-1] - where[0]) + 1 == len(where):
        return slice(int(where[0]), int(where[-1]) + 1)
    return mask


@torch.no_grad()
def _tally(loaded: Loaded, inputs, settings: DiscoverySettings, progress: bool) -> _Tally:
    adapter, model = loaded.adapter, loaded.model
    n_layers = adapter.num_layers(model)
    tally = _Tally(n_layers, adapter.mlp_width(model))
    scan_settings = settings.scan_settings()
    mlp_sites = [adapter.mlp_hidden_site(l) for l in range(n_layers)]
    capture = {adapter.residual_site(l): _norm for l in range(n_layers)}
    capture.update({site: None for site in mlp_sites})
    starts = distributed.shard(range(0, len(inputs), settings.batch_size))  # this process's batches
    for start in tqdm(starts, desc="finding register neurons", disable=not progress or not distributed.is_main()):
        batch = inputs[start : start + settings.batch_size]
        kwargs, lengths, image_hw, _ = model_inputs(loaded, batch, scan_settings)
        with hooks(model, capture=capture) as rec:
            model(**to_model(kwargs, model))
        norms = torch.stack([rec[adapter.residual_site(l)] for l in range(n_layers)], 1).cpu()  # (B, L, N)
        hidden = [rec[site].cpu() for site in mlp_sites]  # L x (B, N, W), signed; not stacked: no copy of all of it
        layouts = _layouts(loaded, norms.shape[-1], lengths, image_hw)
        for i, layout in enumerate(layouts):
            n = layout.n_tokens
            body = body_tokens(layout, text=loaded.modality is Modality.TEXT)
            rows = _as_slice(body)  # the body tokens as a slice where they are contiguous (patches): no copy
            has_body = bool(body.any())
            tau = thresholds(norms[i, :, :n], settings.rule, body.expand(n_layers, n))  # (L,)
            flagged = (norms[i, :, :n] > tau[:, None]) & body  # (L, N)
            tally.outliers += flagged.sum(-1)
            tally.n_body += int(body.sum())
            for l, layer_hidden in enumerate(hidden):
                signed = layer_hidden[i, :n]  # (N, W)
                if settings.sparsity:
                    tally.quiet[l] += (signed.abs() < 0.5).sum(0)
                if has_body:  # a one-token text has no body: it adds no peak (but counts as an input)
                    tally.peak_sum[l] += _signed_extremes(signed[rows]).double()  # a selection: exact in float32
            tally.tokens += n
            tally.inputs += 1
            any_layer = flagged.any(0)  # (N,) outlier somewhere: the only positions a score reads
            if any_layer.any():
                tally.images += flagged.any(-1)
                kept = torch.stack([layer_hidden[i, :n][any_layer] for layer_hidden in hidden])  # (L, F, W)
                tally.kept.append((flagged[:, any_layer], kept.abs()))
    counts = torch.tensor([tally.n_body, tally.tokens, tally.inputs], dtype=torch.long)
    distributed.all_sum(tally.images, tally.outliers, tally.quiet, tally.peak_sum, counts)  # the kept activations stay per process
    tally.n_body, tally.tokens, tally.inputs = (int(v) for v in counts)
    return tally


def _outlier_count(loaded: Loaded, inputs, settings: DiscoverySettings, intervention=None, *, body_tokens: int | None = None) -> dict:
    """Outlier tokens of ``inputs`` (with ``intervention``), by the scan's own measurement (attention off):
    per-model inputs such as SigLIP2's patch mask included.

    With ``body_tokens`` (the inputs' body-token total, which no intervention changes: the count without
    one gives it), the inputs are measured one batch at a time and the count stops once the outliers found
    so far settle the verdict: artifacts remain whatever the other batches hold. The top_k sweep's rejected
    values then cost one batch instead of all; the batches are the ones a full count uses, so a count that
    runs to the end is the full count, number for number. A stopped count says so (``complete``: false) and
    its numbers are lower bounds.
    """
    scan_settings = settings.scan_settings()
    step = scan_settings.batch_size
    if body_tokens is None or distributed.world_size() > 1 or len(inputs) <= step:
        return _count_of(loaded, measure_inputs(loaded, inputs, scan_settings, intervention=intervention, progress=False), settings)
    records: list = []
    for start in range(0, len(inputs), step):
        records += measure_inputs(loaded, inputs[start : start + step], scan_settings, intervention=intervention, progress=False)
        if start + step < len(inputs) and _settled(records, body_tokens, loaded.modality is Modality.TEXT):
            return {**_count_of(loaded, records, settings), "complete": False, "inputs_measured": len(records),
                    "has_artifacts": True}
    return _count_of(loaded, records, settings)


def _settled(records, body_tokens: int, text: bool) -> bool:
    """Whether the outliers of ``records`` alone already make every count over ``body_tokens`` body tokens say
    "artifacts" (``build_report``'s rule: outlier fraction >= MIN_FRACTION in >= 2 layers, any layer for text)."""
    n_layers = len(records[0].layers)
    per_layer = [sum(int(r.outliers[i].sum()) for r in records) for i in range(n_layers)]
    layers = sum(count / body_tokens >= MIN_FRACTION for count in per_layer)
    return layers >= (1 if text else min(2, n_layers))


def _count_of(loaded: Loaded, records, settings: DiscoverySettings) -> dict:
    report = build_report(loaded.name, loaded.modality.value, records, settings.scan_settings())
    per_layer = {row["layer"]: int(sum(int(r.outliers[i].sum()) for r in records)) for i, row in enumerate(report.layers)}
    return {
        "outlier_tokens": sum(per_layer.values()),
        "outlier_layers": report.summary["outlier_layers"],
        "max_ratio": report.summary["max_ratio"],
        "has_artifacts": report.summary["has_artifacts"] if loaded.modality is Modality.VISION else bool(report.summary["outlier_layers"]),
        "per_layer": per_layer,
        "body_tokens": sum(int(r.body.sum()) for r in records),
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
    if not inputs:
        raise SinklessError("no discovery inputs", fix="pass at least one input (or --n-inputs N >= 1)")
    if not heldout:
        raise SinklessError("no held-out inputs to check the fix on", fix="pass at least one held-out input (or --n-heldout N >= 1)")
    n_layers = loaded.num_layers
    for name in ("detection_layer", "highest_layer"):
        value = getattr(settings, name)
        if value is not None and not 0 <= value < n_layers:
            raise SinklessError(f"{name.replace('_', ' ')} {value} is not a layer of {loaded.name} (0..{n_layers - 1})", fix=f"pick a layer from 0 to {n_layers - 1}, or leave it out")
    TestTimeRegisters(loaded, [])  # a model test-time registers cannot fix fails here, before any work
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
        before = _outlier_count(loaded, heldout, settings)
        base.heldout = {"before": before, "after": before}
        if before["has_artifacts"]:
            log.warning(
                "the %d discovery inputs show no outliers but the %d held-out inputs hold %d outlier tokens: "
                "pass more (or other) discovery inputs", len(inputs), len(heldout), before["outlier_tokens"],
            )
        return base

    detection = settings.detection_layer if settings.detection_layer is not None else max(with_outliers, key=lambda l: fractions[l])
    highest = settings.highest_layer if settings.highest_layer is not None else with_outliers[0]
    if tally.images[detection] == 0:
        raise SinklessError(
            f"no discovery input has outliers at detection layer {detection}",
            fix=f"leave out the detection layer, or pick one with outliers: {with_outliers}",
        )
    scores = tally.scores(detection).float()  # (L, W)
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
    if settings.top_k is None and not before["outlier_tokens"] and len(inputs) > 0:
        # nothing on the held-out inputs to remove: any k would "pass" there, unchecked (k=1 can make things worse);
        # the sweep checks the discovery inputs instead, where the outliers were seen, and says so
        log.warning("the %d held-out input(s) have no outlier tokens, so they cannot check the choice of top_k: it is chosen "
                    "on the discovery inputs instead (pass more inputs, or --n-heldout, for a held-out check)", len(heldout))
        heldout, checked_on = list(inputs), "discovery inputs (the held-out ones had no outlier tokens)"
        before = _outlier_count(loaded, heldout, settings)
    else:
        checked_on = "held-out inputs"
    after = None
    if settings.top_k is not None:
        chosen = min(settings.top_k, len(ranked))
        sweep = []
    else:
        sweep, chosen = [], None
        for k in (k for k in SWEEP if k <= len(ranked)):
            ttr = TestTimeRegisters(loaded, found.with_top_k(k), n_registers=settings.n_registers)
            after = _outlier_count(loaded, heldout, settings, intervention=ttr, body_tokens=before["body_tokens"])
            sweep.append({"k": k, "outlier_tokens": after["outlier_tokens"], "max_ratio": after["max_ratio"], "has_artifacts": after["has_artifacts"],
                          **({"inputs_measured": after["inputs_measured"]} if not after.get("complete", True) else {})})
            log.info("top_k %d: %s%d outlier tokens on held-out inputs (before: %d)", k, "at least " if not after.get("complete", True) else "",
                     after["outlier_tokens"], before["outlier_tokens"])
            if not after["has_artifacts"]:
                chosen = k
                break
        if chosen is None:
            chosen = min(settings.max_k, len(ranked))
            log.warning("no top_k up to %d removes the outliers on held-out inputs; keeping %d", chosen, chosen)
            if not sweep or sweep[-1]["k"] != chosen or not after.get("complete", True):
                after = None  # the kept k was not among those tried, or its count stopped early: count it in full
    found = found.with_top_k(chosen)
    found.sweep = sweep
    if after is None:  # the sweep's last try is the chosen k: its held-out counts are the answer already
        after = _outlier_count(loaded, heldout, settings, intervention=TestTimeRegisters(loaded, found, n_registers=settings.n_registers))
    found.heldout = {"before": before, "after": after, "checked_on": checked_on}
    return found
