"""Figures of a language-model scan: attention sinks and massive activations as the papers draw them.

First-token attention per layer (Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks", Fig. 2) and per head x layer (alpha_0 of Gu et al. 2025, "When Attention Sink
Emerges", whose Sink_eps counts the heads above eps); the largest massive activations (Sun et al.
2024); per-token norms as a layer x token map and as coloured token boxes at the peak layer.

Norms are shown as ``norm / median`` (median of the input's body tokens at that layer: every token
but the first), one colour scale per figure with a colorbar. Shapes: L layers, H heads, n tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

from sinkless.scan.measure import InputRecord
from sinkless.scan.plots import MAX_STRIPS, Figure, colorbar, floor_of, focus_layer, place, ranked, ratio_scale, save

__all__ = ["text_figures"]

MAX_MAPS = 2  # inputs that get a layer x token norm map
STRIP_TOKENS = 160  # tokens drawn as boxes per input
PER_ROW = 16


def text_figures(records: list[InputRecord], report: dict, folder: Path) -> list[Figure]:
    figures = []
    if records[0].first_token is not None:
        figures.append(_first_token(records, report, folder))
    if report["layers"] and report["layers"][0].get("alpha0_per_head") is not None:
        figures.append(_alpha0_heads(report, folder))
    if report["massive_activations"]:
        figures.append(_massive(report, folder))
    li = focus_layer(records, report)
    order = ranked(records, li)
    for k, index in enumerate(order[:MAX_MAPS]):
        figures.append(_norm_map(records[index], folder, f"token_norm_layers_{k}.png"))
    why = "the peak outlier layer" if report["summary"].get("peak_layer") is not None else "the layer with the largest norm ratio"
    strips = order[:MAX_STRIPS]
    top = ratio_scale([_ratios(records[i], li)[1 : STRIP_TOKENS] for i in strips], floor_of(report))
    for k, index in enumerate(strips):
        figures.append(_token_strip(records[index], li, top, why, report, folder, f"token_norms_{k}.png"))
    return figures


def _label(token: str, at_most: int = 9) -> str:
    """A token as plain text for matplotlib: visible newlines, no mathtext."""
    return token.replace("\n", "\\n").replace("$", r"\$")[:at_most]


def _ratios(record: InputRecord, li: int) -> np.ndarray:
    return (record.norms[li] / record.medians[li]).numpy()  # (n,)


def _first_token(records: list[InputRecord], report: dict, folder: Path) -> Figure:
    layers = [row["layer"] for row in report["layers"]]
    fig, ax = plt.subplots(figsize=(5.5, 3))
    place(fig, left=0.7, right=0.15, top=0.35, bottom=0.5)
    for r in records[:8]:
        ax.plot(r.layers, r.first_token.numpy(), marker=".", alpha=0.6, label=Path(r.name).name[:20])
    mean = [row["first_token_attention"] for row in report["layers"]]
    ax.plot(layers, [np.nan if m is None else m for m in mean], color="black", linewidth=2, label="mean")
    ax.axhline(0.3, color="crimson", linestyle="--", linewidth=1, label="sink level 0.3")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("attention on the first token")
    ax.set_title("first-token attention share", fontsize=9)
    ax.legend(fontsize=6)
    caption = (
        f"Share of attention that lands on the first token, per layer: mean over heads and over queries from position "
        f"{report['settings']['warmup']} on (Xiao et al. 2024). Thin lines: single inputs (at most 8); thick: the mean. "
        f"A sink takes a large share (here flagged from 30 %) in most layers."
    )
    return Figure(save(fig, folder, "first_token_attention.png"), caption)


def _alpha0_heads(report: dict, folder: Path) -> Figure:
    rows = report["layers"]
    alpha = np.array([row["alpha0_per_head"] for row in rows], dtype=float).T  # (H, L)
    eps = report["settings"]["epsilon"]
    heads, n_layers = alpha.shape
    fig, ax = plt.subplots(figsize=(min(max(6.0, 2.2 + 0.28 * n_layers), 11), min(max(2.4, 1.2 + 0.22 * heads), 6)))
    place(fig, left=0.55, right=1.1, top=0.35, bottom=0.5)
    mapped = ax.imshow(alpha, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    above = np.nonzero(alpha > eps)
    ax.scatter(above[1], above[0], s=4, color="white", marker="o", linewidths=0, label=f"alpha0 > {eps:g}")
    step = max(1, math.ceil(n_layers / 16))
    ax.set_xticks(range(0, n_layers, step), [str(rows[i]["layer"]) for i in range(0, n_layers, step)], fontsize=7)
    ax.set_yticks(range(0, heads, max(1, math.ceil(heads / 12))))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    bar = colorbar(fig, mapped, ax, "alpha0: mean attention\non the first token")
    bar.ax.axhline(eps, color="white", linestyle="--", linewidth=1.2)
    share = float((alpha > eps).mean())
    ax.set_title(f"alpha0 per head: {100 * share:.0f} % of (layer, head) above eps = {eps:g}", fontsize=9)
    caption = (
        f"alpha0 per head and layer: the attention every later query gives the first token, mean over queries and "
        f"inputs (Gu et al. 2025). One colour scale, 0 to 1; white dots: heads above eps = {eps:g}, the ones Sink_eps "
        f"counts ({100 * share:.0f} % here). Sink heads form bands from the layer where the sink emerges."
    )
    return Figure(save(fig, folder, "first_token_attention_heads.png"), caption)


def _massive(report: dict, folder: Path) -> Figure:
    massive = sorted(report["massive_activations"], key=lambda m: -abs(m["value"]))[:20]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    place(fig, left=0.8, right=0.15, top=0.35, bottom=1.0)
    labels = [f"L{m['layer']} t{m['token']} c{m['channel']}" for m in massive]
    ax.bar(range(len(massive)), [abs(m["value"]) for m in massive], color="darkorange")
    ax.set_xticks(range(len(massive)), labels, rotation=70, fontsize=6)
    ax.set_ylabel("|activation|")
    ax.set_yscale("log")
    ax.set_title("largest massive activations (layer, token, channel)", fontsize=9)
    s = report["settings"]
    caption = (
        f"The {len(massive)} largest massive activations (Sun et al. 2024): single residual-stream entries with "
        f"|a| > {s['massive_abs']:g} and > {s['massive_rel']:g}x the layer's median |a|, labelled by layer (L), "
        f"token position (t) and channel (c). They sit on a few tokens and a few fixed channels."
    )
    return Figure(save(fig, folder, "massive_activations.png"), caption)


def _norm_map(record: InputRecord, folder: Path, name: str) -> Figure:
    """Layer x token map of norm / median on a log scale: the first-token sink and secondary outliers."""
    ratios = (record.norms / record.medians[:, None]).numpy()  # (L, n)
    n = ratios.shape[1]
    finite = ratios[np.isfinite(ratios) & (ratios > 0)]  # a 1-token text has no body median: nothing finite
    low = max(float(finite.min()), 0.1) if finite.size else 0.5
    high = max(float(finite.max()) if finite.size else 0.0, low * 10)
    fig, ax = plt.subplots(figsize=(min(3 + 0.13 * n, 13), min(1.9 + 0.16 * len(record.layers), 6.4)))
    place(fig, left=0.5, right=1.1, top=0.35, bottom=1.0)
    mapped = ax.imshow(ratios, cmap="magma", norm=LogNorm(vmin=low, vmax=high), aspect="auto", interpolation="nearest")
    tokens = record.tokens or [str(i) for i in range(n)]
    step = max(1, math.ceil(n / 100))
    ax.set_xticks(range(0, n, step), [_label(tokens[i], 8) for i in range(0, n, step)], rotation=90, fontsize=6)
    lstep = max(1, math.ceil(len(record.layers) / 16))
    ax.set_yticks(range(0, len(record.layers), lstep), [str(record.layers[i]) for i in range(0, len(record.layers), lstep)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xlabel("token" + (f" (one label every {step} tokens)" if step > 1 else ""))
    bar = colorbar(fig, mapped, ax, "norm / median\n(log scale)")
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if low <= t <= high]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.ax.minorticks_off()
    ax.set_title(f"token norm per layer: {Path(record.name).name}", fontsize=9)
    caption = (
        f"{Path(record.name).name}: the residual-stream norm of every token (columns) at every scanned layer (rows), "
        f"divided by the median norm of the input's tokens after the first at that layer; one log colour scale "
        f"({low:.2g}x to {high:.3g}x). A first-token sink is a bright first column from the layer where it forms; "
        f"secondary outliers are isolated bright cells."
    )
    return Figure(save(fig, folder, name), caption)


def _token_strip(record: InputRecord, li: int, top: float, why: str, report: dict, folder: Path, name: str) -> Figure:
    """Tokens as boxes coloured by norm / median at one layer (scale shared by all strips; token 0 clipped)."""
    ratio = _ratios(record, li)
    tokens = record.tokens or [str(i) for i in range(len(ratio))]
    shown = min(len(tokens), STRIP_TOKENS)
    rows = math.ceil(shown / PER_ROW)
    fig, ax = plt.subplots(figsize=(10.5, 0.45 * rows + 0.6))
    place(fig, left=0.05, right=0.9, top=0.35, bottom=0.05)
    cmap = plt.get_cmap("magma_r")
    for i in range(shown):
        x, y = i % PER_ROW, rows - 1 - i // PER_ROW
        value = min(ratio[i], top) / top
        clipped = ratio[i] > top
        ax.add_patch(plt.Rectangle((x, y), 0.95, 0.85, facecolor=cmap(value), edgecolor="crimson" if clipped else "none", linewidth=1.5))
        label = _label(tokens[i]) if not clipped else f"{_label(tokens[i], 5)} {ratio[i]:.0f}x"
        ax.text(x + 0.47, y + 0.42, label, ha="center", va="center", fontsize=6, color="white" if value > 0.6 else "black")
    ax.set_xlim(0, PER_ROW)
    ax.set_ylim(0, rows)
    ax.axis("off")
    mapped = plt.cm.ScalarMappable(norm=plt.Normalize(0, top), cmap=cmap)
    floor = floor_of(report) if report["settings"]["rule"]["absolute"] is None else None
    colorbar(fig, mapped, ax, "norm / median", floor)
    layer = record.layers[li]
    ax.set_title(f"{Path(record.name).name}: token norm / median at layer {layer}", fontsize=8)
    more = f" (first {shown} of {len(tokens)} tokens)" if shown < len(tokens) else ""
    caption = (
        f"{Path(record.name).name}{more}: each token coloured by its norm / the median token norm at layer {layer} "
        f"({why}), one colour scale for every strip "
        f"(0 to {top:.1f}x); tokens beyond it (the first-token sink) are clipped and show their ratio."
    )
    return Figure(save(fig, folder, name), caption)
