"""Figures of a scan: what a person looks at first (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sinkless._io import atomic_path  # noqa: E402
from sinkless.scan.inputs import ImageInput  # noqa: E402
from sinkless.scan.measure import InputRecord  # noqa: E402

__all__ = ["vision_figures", "text_figures"]

MAX_STRIPS = 4  # inputs that get their own per-layer strip


def _save(fig, folder: Path, name: str) -> str:
    try:
        with atomic_path(folder / name, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return name


def _shown_layers(layers: list[int], at_most: int = 12) -> list[int]:
    if len(layers) <= at_most:
        return list(range(len(layers)))
    return sorted({round(i * (len(layers) - 1) / (at_most - 1)) for i in range(at_most)})


def vision_figures(records: list[InputRecord], inputs: list[ImageInput], report: dict, folder: Path) -> list[str]:
    names = []
    by_name = {item.name: item for item in inputs}
    for k, record in enumerate(records[:MAX_STRIPS]):
        names.append(_norm_strip(record, by_name[record.name], folder, f"norms_{k}.png"))
        if record.cls_attention is not None:
            names.append(_cls_attention(record, by_name[record.name], folder, f"cls_attention_{k}.png"))
    names.append(_histogram(records, report, folder))
    names.append(_ratio_per_layer(records, report, folder))
    return names


def _grid_map(record: InputRecord, li: int) -> np.ndarray:
    h, w = record.layout.grid
    return record.norms[li][record.layout.body].numpy().reshape(h, w)


def _norm_strip(record: InputRecord, item: ImageInput, folder: Path, name: str) -> str:
    shown = _shown_layers(record.layers)
    cols = len(shown) + 1
    fig, axes = plt.subplots(1, cols, figsize=(1.6 * cols, 2.0))
    image = item.image.resize(record.image_hw[::-1])
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=8)
    for ax, li in zip(axes[1:], shown):
        grid = _grid_map(record, li)
        ax.imshow(image, alpha=0.35)
        ax.imshow(grid, cmap="inferno", alpha=0.85, extent=(0, image.size[0], image.size[1], 0), interpolation="nearest")
        flagged = record.outliers[li][record.layout.body].numpy().reshape(grid.shape)
        title = f"L{record.layers[li]}" + (f" ({flagged.sum()}!)" if flagged.any() else "")
        ax.set_title(title, fontsize=8, color="crimson" if flagged.any() else "black")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"token norm per layer: {Path(record.name).name}", fontsize=9)
    return _save(fig, folder, name)


def _cls_attention(record: InputRecord, item: ImageInput, folder: Path, name: str) -> str:
    h, w = record.layout.grid
    attention = record.cls_attention[record.layout.body].numpy().reshape(h, w)
    image = item.image.resize(record.image_hw[::-1])
    fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(image, alpha=0.35)
    axes[1].imshow(attention, cmap="viridis", alpha=0.85, extent=(0, image.size[0], image.size[1], 0), interpolation="nearest")
    axes[1].set_title(f"CLS attention, layer {record.layers[-1]}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    return _save(fig, folder, name)


def _histogram(records: list[InputRecord], report: dict, folder: Path) -> str:
    peak = report["summary"].get("peak_layer")
    li = records[0].layers.index(peak) if peak is not None else len(records[0].layers) - 1
    ratios = np.concatenate([(r.norms[li][r.body] / r.medians[li]).numpy() for r in records])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(ratios, bins=80, color="steelblue", log=True)
    floor = report["settings"]["rule"]["floor"]
    if report["settings"]["rule"]["absolute"] is None:
        ax.axvline(floor, color="crimson", linestyle="--", label=f"outlier floor {floor:g}x median")
        ax.legend(fontsize=8)
    ax.set_xlabel("token norm / median token norm of its input")
    ax.set_ylabel("tokens (log)")
    ax.set_title(f"norm distribution at layer {records[0].layers[li]}", fontsize=9)
    return _save(fig, folder, "norm_histogram.png")


def _ratio_per_layer(records: list[InputRecord], report: dict, folder: Path) -> str:
    layers = [row["layer"] for row in report["layers"]]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(layers, [row["max_ratio"] for row in report["layers"]], marker="o", label="max/median (median over inputs)")
    ax.plot(layers, [row["max_ratio_worst"] for row in report["layers"]], marker=".", linestyle=":", label="max/median (worst input)")
    ax.axhline(report["settings"]["rule"]["floor"], color="crimson", linestyle="--", linewidth=1, label="outlier floor")
    ax.set_xlabel("layer")
    ax.set_ylabel("max / median token norm")
    ax2 = ax.twinx()
    ax2.bar(layers, [row["outlier_fraction"] * 100 for row in report["layers"]], alpha=0.2, color="crimson")
    ax2.set_ylabel("outlier tokens (%)", color="crimson")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("artifact strength per layer", fontsize=9)
    return _save(fig, folder, "max_ratio_per_layer.png")


# -- text --------------------------------------------------------------------------------------------
def text_figures(records: list[InputRecord], report: dict, folder: Path) -> list[str]:
    names = []
    layers = [row["layer"] for row in report["layers"]]
    if report["layers"][0]["first_token_attention"] is not None:
        fig, ax = plt.subplots(figsize=(5, 3))
        for r in records[:8]:
            ax.plot(r.layers, r.first_token.numpy(), marker=".", alpha=0.6, label=Path(r.name).name[:20])
        ax.plot(layers, [row["first_token_attention"] for row in report["layers"]], color="black", linewidth=2, label="mean")
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("attention on the first token")
        ax.set_title("first-token attention share", fontsize=9)
        ax.legend(fontsize=6)
        names.append(_save(fig, folder, "first_token_attention.png"))
    massive = sorted(report["massive_activations"], key=lambda m: -abs(m["value"]))[:20]
    if massive:
        fig, ax = plt.subplots(figsize=(6, 3))
        labels = [f"L{m['layer']} t{m['token']} c{m['channel']}" for m in massive]
        ax.bar(range(len(massive)), [abs(m["value"]) for m in massive], color="darkorange")
        ax.set_xticks(range(len(massive)), labels, rotation=70, fontsize=6)
        ax.set_ylabel("|activation|")
        ax.set_yscale("log")
        ax.set_title("largest massive activations (layer, token, channel)", fontsize=9)
        names.append(_save(fig, folder, "massive_activations.png"))
    for k, r in enumerate(records[:MAX_STRIPS]):
        names.append(_token_strip(r, report, folder, f"token_norms_{k}.png"))
    return names


def _token_strip(record: InputRecord, report: dict, folder: Path, name: str) -> str:
    """Tokens as coloured boxes (norm / median at the peak outlier layer, or the middle layer)."""
    peak = report["summary"].get("peak_layer")
    li = record.layers.index(peak) if peak is not None else len(record.layers) // 2
    ratio = (record.norms[li] / record.medians[li]).numpy()
    tokens = record.tokens or [str(i) for i in range(len(ratio))]
    shown = min(len(tokens), 160)
    per_row = 16
    rows = math.ceil(shown / per_row)
    fig, ax = plt.subplots(figsize=(10, 0.45 * rows + 0.6))
    cmap = plt.get_cmap("magma_r")
    top = max(4.0, float(np.percentile(ratio[1:shown], 99)) if shown > 1 else 4.0)
    for i in range(shown):
        x, y = i % per_row, rows - 1 - i // per_row
        value = min(ratio[i], top) / top
        ax.add_patch(plt.Rectangle((x, y), 0.95, 0.85, color=cmap(value)))
        label = tokens[i].replace("\n", "\\n").replace("$", r"\$")[:9]
        ax.text(x + 0.47, y + 0.42, label, ha="center", va="center", fontsize=6, color="white" if value > 0.6 else "black")
    ax.set_xlim(0, per_row)
    ax.set_ylim(0, rows)
    ax.axis("off")
    ax.set_title(f"{Path(record.name).name}: token norm / median at layer {record.layers[li]} (token 0 clipped)", fontsize=8)
    return _save(fig, folder, name)
