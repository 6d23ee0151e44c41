"""What a report figure shows, read back from its matplotlib artists before it is saved (tests of the figures)."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle


def _hex(color) -> str:
    return to_hex(color, keep_alpha=True)


def _margins(fig, ax) -> tuple:
    """(left, right, top, bottom) of the axis box in inches from the figure's edges, rounded to 1e-6."""
    width, height = fig.get_size_inches()
    box = ax.get_position()
    return tuple(round(float(v), 6) for v in (box.x0 * width, (1 - box.x1) * width, (1 - box.y1) * height, box.y0 * height))


def _colorbar(ax):
    bar = getattr(ax, "_colorbar", None)
    if bar is None:
        return None
    norm = bar.mappable.norm
    return {"cmap": bar.mappable.get_cmap().name, "norm": type(norm).__name__, "range": (norm.vmin, norm.vmax)}


def facts(fig) -> dict:
    """Titles, labels, ticks, limits, images, lines, texts, boxes, legends and scatter points of every axis.

    Also how they are drawn: the figure's size, every axis's margins in inches, font sizes, tick rotations, line
    markers and alpha, image interpolation, text placement, box line widths, scatter sizes/colours/markers and the
    colour scale behind a colorbar.
    """
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
            "margins": _margins(fig, ax), "aspect": ax.get_aspect(), "axis_on": ax.axison,
            "title_size": ax.title.get_fontsize(),
            "xtick_style": sorted({(t.get_fontsize(), t.get_rotation()) for t in ax.get_xticklabels()}),
            "ytick_style": sorted({(t.get_fontsize(), t.get_rotation()) for t in ax.get_yticklabels()}),
            "legend_sizes": sorted({t.get_fontsize() for t in legend.get_texts()}) if legend is not None else None,
            "line_style": [{"marker": line.get_marker(), "alpha": line.get_alpha()} for line in ax.lines],
            "interpolation": [im.get_interpolation() for im in ax.images],
            "text_style": [{"xy": tuple(float(v) for v in t.get_position()), "ha": t.get_horizontalalignment(),
                            "va": t.get_verticalalignment(), "size": t.get_fontsize()} for t in ax.texts],
            "box_widths": [float(p.get_linewidth()) for p in ax.patches if isinstance(p, Rectangle)],
            "scatter": [{"sizes": np.asarray(c.get_sizes()).tolist(), "face": [_hex(f) for f in c.get_facecolor()],
                         "widths": np.asarray(c.get_linewidths()).tolist(), "label": c.get_label(),
                         "marker": np.asarray(c.get_paths()[0].vertices)} for c in ax.collections if isinstance(c, PathCollection)],
            "colorbar": _colorbar(ax),
        })
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else None
    return {"suptitle": suptitle, "size": tuple(round(float(v), 6) for v in fig.get_size_inches()), "axes": axes}
