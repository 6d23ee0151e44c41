"""What a report figure shows, read back from its matplotlib artists before it is saved (tests of the figures)."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle


def _hex(color) -> str:
    return to_hex(color, keep_alpha=True)


def facts(fig) -> dict:
    """Titles, labels, ticks, limits, images, lines, texts, boxes, legends and scatter points of every axis."""
    axes = []
    for ax in fig.axes:
        legend = ax.get_legend()
        axes.append({
            "title": ax.get_title(), "title_color": _hex(ax.title.get_color()),
            "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "ylabel_color": _hex(ax.yaxis.label.get_color()),
            "xticks": [t.get_text() for t in ax.get_xticklabels()], "xtick_pos": [float(v) for v in ax.get_xticks()],
            "yticks": [t.get_text() for t in ax.get_yticklabels()], "ytick_pos": [float(v) for v in ax.get_yticks()],
            "xlim": tuple(float(v) for v in ax.get_xlim()), "ylim": tuple(float(v) for v in ax.get_ylim()),
            "yscale": ax.get_yscale(),
            "images": [{"cmap": im.get_cmap().name, "clim": tuple(float(v) for v in im.get_clim()), "norm": type(im.norm).__name__,
                        "data": np.asarray(im.get_array())} for im in ax.images],
            "lines": [{"x": np.asarray(line.get_xdata(), dtype=float), "y": np.asarray(line.get_ydata(), dtype=float),
                       "color": _hex(line.get_color()), "width": float(line.get_linewidth()), "style": line.get_linestyle(),
                       "label": line.get_label()} for line in ax.lines],
            "texts": [{"text": t.get_text(), "color": _hex(t.get_color())} for t in ax.texts],
            "boxes": [{"xy": tuple(float(v) for v in p.get_xy()), "size": (float(p.get_width()), float(p.get_height())),
                       "face": _hex(p.get_facecolor()), "edge": _hex(p.get_edgecolor()), "fill": p.get_fill()}
                      for p in ax.patches if isinstance(p, Rectangle)],
            "legend": [t.get_text() for t in legend.get_texts()] if legend is not None else None,
            "points": [np.asarray(c.get_offsets()) for c in ax.collections],
        })
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else None
    return {"suptitle": suptitle, "axes": axes}
