"""Figures of a scan, as the papers draw them (matplotlib, Agg backend, PNG files with captions).

Vision (Darcet et al. 2024, "Vision Transformers Need Registers", Figs. 1-3): the signature picture
(the inputs with the most outliers, high-norm patches boxed, the norm map and the CLS attention
map at the peak layer), per-input norm maps across layers, the norm histogram at the peak layer and
the max/median ratio per layer. Text figures are in ``text_plots``.

Every norm map is drawn as ``norm / median`` (the median body-token norm of the same input at the
same layer), opaque, on ONE colour scale per figure with a colorbar, so panels and layers compare
directly. The scale runs from 0 to at least the outlier floor (3x), so a clean model looks flat
and an artifact stands out. Figures are deterministic: same scan, same bytes.

Shapes: L scanned layers, N tokens, P = h*w patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from sinkless._io import atomic_path  # noqa: E402
from sinkless.scan.inputs import ImageInput  # noqa: E402
from sinkless.scan.measure import InputRecord  # noqa: E402

if TYPE_CHECKING:
    from sinkless.scan.report import Report

__all__ = ["Figure", "draw_figures", "vision_figures", "RATIO_LABEL"]

MAX_STRIPS = 4  # inputs that get their own figures (the ones with the most outliers)
RATIO_LABEL = "token norm / median norm\n(same input and layer)"
NORM_CMAP = "inferno"
_PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same scan, same bytes


@dataclass(frozen=True)
class Figure:
    """One PNG of a report and the sentence that explains it (shown under it in the HTML)."""

    name: str
    caption: str


def draw_figures(report: Report, records: list[InputRecord], inputs, folder: Path) -> list[Figure]:
    """Draw the figures of ``report`` into ``folder``; sets ``report.figures`` and ``report.figure_captions``."""
    if report.modality == "vision":
        figures = vision_figures(records, list(inputs), report.to_dict(), folder)
    else:
        from sinkless.scan.text_plots import text_figures

        figures = text_figures(records, report.to_dict(), folder)
    report.figures = [f.name for f in figures]
    report.figure_captions = {f.name: f.caption for f in figures}
    return figures


# -- shared helpers --------------------------------------------------------------------------------
def save(fig, folder: Path, name: str) -> str:
    try:
        with atomic_path(folder / name, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, metadata=_PNG_METADATA)
    finally:
        plt.close(fig)
    return name


def ratio_scale(ratios: list[np.ndarray], floor: float) -> float:
    """Top of a shared norm/median colour scale: the largest ratio shown, at least the outlier floor."""
    finite = [r[np.isfinite(r)] for r in ratios]
    return max([floor] + [float(r.max()) for r in finite if r.size])


def place(fig, *, left: float, right: float, top: float, bottom: float, wspace: float = 0.2, hspace: float = 0.2) -> None:
    """Fixed margins in inches (no layout engine: constrained layout tripled the time of a figure)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=wspace, hspace=hspace)


def colorbar(fig, mappable, axes, label: str, floor: float | None = None, *, pad: float = 0.08, width: float = 0.12):
    """One colorbar right of ``axes`` (an axis or a row of them), as tall as they are drawn; ``pad``/``width`` in inches.

    A dashed cyan line marks the outlier floor on it when given.
    """
    axes = list(np.atleast_1d(axes).flat)
    for ax in axes:
        ax.apply_aspect()  # images keep their aspect: place the bar by the box actually drawn
    boxes = [ax.get_position() for ax in axes]
    fig_width, _ = fig.get_size_inches()
    x0 = max(b.x1 for b in boxes) + pad / fig_width
    y0, y1 = min(b.y0 for b in boxes), max(b.y1 for b in boxes)
    bar = fig.colorbar(mappable, cax=fig.add_axes((x0, y0, width / fig_width, y1 - y0)))
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if floor is not None:
        bar.ax.axhline(floor, color="cyan", linestyle="--", linewidth=2)
    return bar


def focus_layer(records: list[InputRecord], report: dict) -> int:
    """Index (into the scanned layers) of the layer figures show: the peak outlier layer, else the strongest ratio."""
    peak = report["summary"].get("peak_layer")
    if peak is not None:
        return records[0].layers.index(peak)
    worst = [row.get("max_ratio_worst") or 0.0 for row in report["layers"]]
    return int(np.argmax(worst)) if worst else len(records[0].layers) - 1


def ranked(records: list[InputRecord], li: int) -> list[int]:
    """Input indices, most outliers at layer ``li`` first (then most outliers overall, then the largest ratio)."""

    def key(k: int):
        r = records[k]
        body = r.norms[li][r.body]
        ratio = float(body.max() / r.medians[li]) if len(body) else 0.0
        return (-int(r.outliers[li].sum()), -int(r.outliers.sum()), -ratio, k)

    return sorted(range(len(records)), key=key)


def floor_of(report: dict) -> float:
    return float(report["settings"]["rule"]["floor"])


# -- vision ----------------------------------------------------------------------------------------
def vision_figures(records: list[InputRecord], inputs: list[ImageInput], report: dict, folder: Path) -> list[Figure]:
    by_name = {item.name: item for item in inputs}
    li = focus_layer(records, report)
    order = ranked(records, li)[:MAX_STRIPS]
    figures = [_overlay(records, order, by_name, li, report, folder)]
    for k, index in enumerate(order):
        figures.append(_norm_strip(records[index], by_name[records[index].name], report, folder, f"norms_{k}.png"))
    figures.append(_histogram(records, li, report, folder))
    figures.append(_ratio_per_layer(report, folder))
    return figures


def _image(record: InputRecord, item: ImageInput) -> Image.Image:
    """The input as the model saw it (whole image resized, no crop)."""
    return item.image.convert("RGB").resize(record.image_hw[::-1], Image.BICUBIC)


def _ratio_grid(record: InputRecord, li: int) -> np.ndarray:
    """(h, w) norm / median of the patches at scanned-layer index ``li``."""
    h, w = record.layout.grid
    return (record.norms[li][record.layout.body] / record.medians[li]).numpy().reshape(h, w)


def _flagged(record: InputRecord, li: int) -> np.ndarray:
    h, w = record.layout.grid
    return record.outliers[li][record.layout.body].numpy().reshape(h, w)


def _box_outliers(ax, flagged: np.ndarray, size: tuple[int, int], color: str = "cyan") -> None:
    """Outline the flagged patches on an axis showing an image of ``size`` (width, height) pixels."""
    h, w = flagged.shape
    ph, pw = size[1] / h, size[0] / w
    for row, col in zip(*np.nonzero(flagged)):
        ax.add_patch(plt.Rectangle((col * pw, row * ph), pw, ph, fill=False, edgecolor=color, linewidth=1.2))


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _short(name: str, at_most: int = 22) -> str:
    name = Path(name).name
    return name if len(name) <= at_most else name[: at_most - 1] + "…"


def _overlay(records, order, by_name, li, report, folder) -> Figure:
    """The signature picture: image with high-norm patches boxed; norm map; CLS attention (shared scales)."""
    layer = records[0].layers[li]
    with_attention = all(records[k].cls_attention is not None for k in order)
    rows = 3 if with_attention else 2
    cols = len(order)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 1.6, 2.25 * rows + 0.7), squeeze=False)
    place(fig, left=0.45, right=1.15, top=0.75, bottom=0.05, wspace=0.06, hspace=0.08)
    floor = floor_of(report)
    ratios = [_ratio_grid(records[k], li) for k in order]
    top = ratio_scale(ratios, floor)
    attention = []
    if with_attention:
        for k in order:
            r = records[k]
            attention.append(r.cls_attention[r.layout.body].numpy().reshape(r.layout.grid))
    # attention: one scale too, from its smallest to its largest value (spikes matter, not the floor)
    attention_low = min((float(a.min()) for a in attention), default=0.0)
    attention_top = max((float(a.max()) for a in attention), default=1.0)
    for c, k in enumerate(order):
        r = records[k]
        image = _image(r, by_name[r.name])
        flagged = _flagged(r, li)
        axes[0, c].imshow(image)
        _box_outliers(axes[0, c], flagged, image.size)
        axes[0, c].set_title(f"{_short(r.name)}\n{_count(int(flagged.sum()), 'outlier patch', 'outlier patches')}", fontsize=8,
                             color="crimson" if flagged.any() else "black")
        norm_map = axes[1, c].imshow(ratios[c], cmap=NORM_CMAP, vmin=0, vmax=top, interpolation="nearest")
        if with_attention:
            attention_map = axes[2, c].imshow(attention[c], cmap="viridis", vmin=attention_low, vmax=attention_top, interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input,\noutliers boxed", fontsize=8)
    axes[1, 0].set_ylabel(f"token norm\nlayer {layer}", fontsize=8)
    colorbar(fig, norm_map, axes[1, :], RATIO_LABEL, floor if report["settings"]["rule"]["absolute"] is None else None)
    if with_attention:
        axes[2, 0].set_ylabel(f"CLS attention\nlayer {records[0].layers[-1]}", fontsize=8)
        colorbar(fig, attention_map, axes[2, :], "CLS attention\n(mean over heads)")
    peak = report["summary"].get("peak_layer")
    what = f"layer {layer}, the peak outlier layer" if peak is not None else f"layer {layer}, the largest norm ratio (no outliers)"
    fig.suptitle(f"high-norm tokens at {what}", fontsize=10)
    n_out = sum(int(_flagged(records[k], li).sum()) for k in order)
    caption = (
        f"The artifact picture (Darcet et al. 2024, Fig. 1-2) for the {cols} input(s) with the most outlier tokens "
        f"{'' if peak is not None else '(here: none; the ones with the largest norm ratio) '}at {what}. Top: the input as the model sees it, with its outlier patches ({n_out} in all) boxed in cyan. Middle: each "
        f"patch's token norm divided by the median patch norm of that image, one colour scale for all panels "
        f"(0 to {top:.1f}x; dashed line on the colorbar: the {floor:g}x outlier floor)."
    )
    if with_attention:
        caption += (f" Bottom: the attention CLS gives each patch at the last scanned layer ({records[0].layers[-1]}), "
                    f"mean over heads, one scale ({attention_low:.2g} to {attention_top:.2g}); artifact patches draw spikes of it.")
    return Figure(save(fig, folder, "artifact_overlay.png"), caption)


def _shown_layers(layers: list[int], at_most: int = 12) -> list[int]:
    if len(layers) <= at_most:
        return list(range(len(layers)))
    return sorted({round(i * (len(layers) - 1) / (at_most - 1)) for i in range(at_most)})


def _norm_strip(record: InputRecord, item: ImageInput, report: dict, folder: Path, name: str) -> Figure:
    """One input's norm map at every (shown) layer, on one colour scale."""
    shown = _shown_layers(record.layers)
    cols = len(shown) + 1
    fig, axes = plt.subplots(1, cols, figsize=(0.95 * cols + 1.0, 1.75))
    place(fig, left=0.05, right=0.95, top=0.6, bottom=0.05, wspace=0.06)
    image = _image(record, item)
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=8)
    floor = floor_of(report)
    grids = [_ratio_grid(record, li) for li in shown]
    top = ratio_scale(grids, floor)
    for ax, li, grid in zip(axes[1:], shown, grids):
        mapped = ax.imshow(grid, cmap=NORM_CMAP, vmin=0, vmax=top, interpolation="nearest")
        flagged = _flagged(record, li)
        title = f"layer {record.layers[li]}\n" + (_count(int(flagged.sum()), "outlier", "outliers") if flagged.any() else " ")
        ax.set_title(title, fontsize=8, color="crimson" if flagged.any() else "black")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    colorbar(fig, mapped, list(axes[1:]), "norm / median", floor if report["settings"]["rule"]["absolute"] is None else None)
    fig.suptitle(f"token norm per layer: {_short(record.name, 40)}", fontsize=9)
    skipped = "" if len(shown) == len(record.layers) else f" ({len(shown)} of the {len(record.layers)} scanned layers, evenly spaced)"
    caption = (
        f"{Path(record.name).name}: the norm of every patch token at each layer{skipped}, divided by the median patch "
        f"norm of this image at that layer, on one colour scale for all layers (0 to {top:.1f}x). Outliers stand "
        f"out as isolated bright patches; the panel title counts them."
    )
    return Figure(save(fig, folder, name), caption)


def _histogram(records: list[InputRecord], li: int, report: dict, folder: Path) -> Figure:
    ratios = np.concatenate([(r.norms[li][r.body] / r.medians[li]).numpy() for r in records])
    layer = records[0].layers[li]
    fig, ax = plt.subplots(figsize=(5, 3))
    place(fig, left=0.7, right=0.15, top=0.35, bottom=0.5)
    ax.hist(ratios, bins=80, color="steelblue", log=True)
    floor = floor_of(report)
    if report["settings"]["rule"]["absolute"] is None:
        ax.axvline(floor, color="crimson", linestyle="--", label=f"outlier floor {floor:g}x median")
        ax.legend(fontsize=8)
    ax.set_xlabel("token norm / median token norm of its input")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(f"norm distribution at layer {layer}", fontsize=9)
    caption = (
        f"Histogram of token norm / median over the {len(ratios)} patch tokens of all {len(records)} input(s) at "
        f"layer {layer}. Artifacts make it bimodal (Darcet et al. 2024, Fig. 3): a second mode far right of the floor."
    )
    return Figure(save(fig, folder, "norm_histogram.png"), caption)


def _ratio_per_layer(report: dict, folder: Path) -> Figure:
    rows = report["layers"]
    layers = [row["layer"] for row in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3))
    place(fig, left=0.7, right=0.7, top=0.35, bottom=0.5)
    ax.plot(layers, [row["max_ratio"] for row in rows], marker="o", label="max/median (median over inputs)")
    ax.plot(layers, [row["max_ratio_worst"] for row in rows], marker=".", linestyle=":", label="max/median (worst input)")
    ax.axhline(floor_of(report), color="crimson", linestyle="--", linewidth=1, label="outlier floor")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("max / median token norm")
    ax2 = ax.twinx()
    ax2.bar(layers, [100 * (row["outlier_fraction"] or 0.0) for row in rows], alpha=0.2, color="crimson")
    ax2.set_ylabel("outlier tokens (%)", color="crimson")
    ax.set_zorder(ax2.get_zorder() + 1)  # lines over the bars
    ax.patch.set_visible(False)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("artifact strength per layer", fontsize=9)
    caption = (
        "Per layer: the largest token norm over the median one (lines; median over inputs and the worst input) "
        "against the outlier floor, and the share of tokens that are outliers (bars, right axis). Artifacts appear "
        "from a middle layer on and persist."
    )
    return Figure(save(fig, folder, "max_ratio_per_layer.png"), caption)
