"""Diagnose: where a model's high-norm tokens, attention sinks and massive activations are.

``scan(loaded, inputs, settings)`` measures every layer (norms, outliers, attention shares, Sink_eps,
massive activations) and returns the ``Report`` with the per-input records behind it;
``write_reports`` writes ``report.json``, ``report.html`` and PNG figures. See the README for the
JSON schema. Under ``torchrun`` / ``accelerate launch`` each process measures its share of the
batches and every process receives all records, in input order (``sinkless.distributed``).

This package is also the public function ``sinkless.scan(model, inputs, processor=None, **settings)``
(``sinkless.api.scan``): the module object is callable, so ``sinkless.scan(...)`` scans while
``from sinkless.scan import ScanSettings`` keeps importing from the package.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from sinkless import distributed
from sinkless._io import atomic_write_json, staged_dir
from sinkless.scan.html import render
from sinkless.scan.inputs import ImageInput, TextInput, resolve_inputs, sample_text
from sinkless.scan.measure import InputRecord, ScanSettings, measure_batch, parse_layers
from sinkless.scan.norms import OutlierRule, Rule
from sinkless.scan.plots import draw_figures
from sinkless.scan.report import Report, build_report
from sinkless.zoo import Loaded

__all__ = [
    "scan",
    "write_reports",
    "ScanSettings",
    "OutlierRule",
    "Rule",
    "Report",
    "ImageInput",
    "TextInput",
    "resolve_inputs",
    "parse_layers",
    "sample_text",
    "summary_lines",
]

log = logging.getLogger(__name__)


def measure(
    loaded: Loaded,
    inputs: Sequence[ImageInput] | Sequence[TextInput],
    settings: ScanSettings = ScanSettings(),
    *,
    intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
) -> list[InputRecord]:
    """Per-input records for ``inputs``, in batches of ``settings.batch_size``."""
    batches = [inputs[start : start + settings.batch_size] for start in range(0, len(inputs), settings.batch_size)]
    mine = distributed.shard(range(len(batches)))  # every batch here, or this process's share of them
    per_batch: dict[int, list[InputRecord]] = {}
    shown = progress and distributed.is_main()
    with tqdm(total=sum(len(batches[k]) for k in mine), desc=f"scanning {loaded.name}", unit="input", disable=not shown) as bar:
        for k in mine:
            per_batch[k] = measure_batch(loaded, batches[k], settings, intervention=intervention)
            bar.update(len(batches[k]))
    merged = distributed.gather_dict(per_batch)  # {batch index: records} from every process
    return [record for k in range(len(batches)) for record in merged[k]]


def scan(
    loaded: Loaded,
    inputs: Sequence[ImageInput] | Sequence[TextInput],
    settings: ScanSettings = ScanSettings(),
    *,
    intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
    extra_settings: dict | None = None,
    progress: bool = True,
) -> tuple[Report, list[InputRecord]]:
    """Scan ``inputs`` with ``loaded``: the report and the per-input records behind it."""
    if not inputs:
        raise ValueError("nothing to scan")
    records = measure(loaded, inputs, settings, intervention=intervention, progress=progress)
    report = build_report(loaded.name, loaded.modality.value, records, settings, extra_settings)
    return report, records


def write_reports(
    out_dir: str | Path,
    scans: Sequence[tuple[Report, list[InputRecord], Sequence]],
) -> list[Path]:
    """Write each scan's report.json and figures (the first at the top, others in sub-folders) and one report.html.

    Written through a staging folder: nothing lands in ``out_dir`` unless everything succeeded.
    """
    written = []
    with staged_dir(out_dir, kind="scan") as stage:
        pages = []
        for k, (report, records, inputs) in enumerate(scans):
            prefix = "" if k == 0 else report.model.replace("/", "_")
            folder = stage / prefix if prefix else stage
            folder.mkdir(parents=True, exist_ok=True)
            draw_figures(report, records, inputs, folder)  # sets report.figures and their captions
            data = report.to_dict()
            atomic_write_json(folder / "report.json", data)
            pages.append((data, prefix))
            written.append(Path(out_dir) / prefix / "report.json" if prefix else Path(out_dir) / "report.json")
        (stage / "report.html").write_text(render(pages, root=stage), encoding="utf-8")
    return written


def _span(layers: list[int]) -> str:
    if not layers:
        return "none"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def summary_lines(report: Report) -> list[str]:
    """A short human summary of a report for the terminal."""
    s = report.summary
    verdict = {True: "ARTIFACTS FOUND", False: "no artifacts found", None: "no verdict (too little was measured, see the notes)"}[s["has_artifacts"]]
    lines = [f"{report.model} ({report.modality}, {s['n_inputs']} inputs): {verdict}"]
    if report.modality == "vision":
        if s["first_outlier_layer"] is not None:
            ns = s["neighbor_similarity"] or {}
            peak = max((o["ratio"] for o in report.outliers), default=s["max_ratio"])
            lines += [
                f"  outlier tokens from layer {s['first_outlier_layer']} (layers {_span(s['outlier_layers'])}), "
                f"{100 * s['outlier_fraction']:.2f} % of patches, up to {peak:.1f}x the median norm (typical image: {s['max_ratio']:.1f}x)",
                f"  on the border: {100 * (s['border_fraction'] or 0):.0f} % (a random patch: {100 * s['border_fraction_expected']:.0f} %); "
                f"neighbour similarity {ns.get('outliers') or 0:.2f} vs {ns.get('others') or 0:.2f} for other patches",
                f"  attention they draw after layer {s['first_outlier_layer']}: "
                + (f"{100 * s['sink_share']:.1f} % (CLS: {100 * (s.get('sink_share_cls') or 0):.1f} %)" if s["sink_share"] is not None else "not measured"),
            ]
        else:
            rule = report.settings["rule"]
            bar = f"outlier threshold: norm > {rule['absolute']:g}" if rule.get("absolute") is not None else f"outlier floor {rule['floor']:g}x"
            worst = max((row.get("max_ratio_worst") or 0 for row in report.layers), default=0) or s["max_ratio"]
            lines.append(f"  max/median token norm at most {worst:.2f}x in any image and layer (typical image: {s['max_ratio']:.2f}x; {bar})")
    else:
        sinks = [row["layer"] for row in report.layers if (row["first_token_attention"] or 0) >= 0.3]
        if s["sink_share"] is None:
            lines.append("  first-token attention: not measured")
        else:
            lines.append(
                f"  first-token attention: mean {100 * s['sink_share']:.0f} %, max {100 * (s['first_token_attention_max'] or 0):.0f} %; "
                f">= 30 % in layers {_span(sinks) if len(sinks) < 2 or sinks == list(range(sinks[0], sinks[-1] + 1)) else sinks}; "
                f"Sink_eps={report.settings['epsilon']:g}: {100 * (s['sink_epsilon'] or 0):.0f} % of heads"
            )
        if report.massive_activations:
            tokens = sorted({m["token"] for m in report.massive_activations})
            layers = sorted({m["layer"] for m in report.massive_activations})
            channels = sorted({m["channel"] for m in report.massive_activations})
            top = max(report.massive_activations, key=lambda m: abs(m["value"]))
            lines.append(
                f"  massive activations at tokens {tokens[:8]}, layers {_span(layers)}, channels {channels[:8]}; "
                f"largest {top['value']:.0f} (layer {top['layer']}, token {top['token']}, channel {top['channel']})"
            )
        for word in s.get("secondary_outliers", [])[:5]:
            lines.append(f"  secondary outlier {word['text']!r}: {word['count']}x in layers {_span(word['layers'])}, up to {word['max_ratio']:.1f}x the median norm")
    lines += [f"  note: {note}" for note in s.get("notes", [])]
    return lines


class _CallableModule(types.ModuleType):
    """``sinkless.scan`` is this package and, called, the public ``sinkless.api.scan``."""

    def __call__(self, model, inputs, processor=None, **settings) -> Report:
        from sinkless.api import scan as scan_model

        return scan_model(model, inputs, processor, **settings)


sys.modules[__name__].__class__ = _CallableModule
