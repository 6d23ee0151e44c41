"""The HTML page of a scan: one self-contained file a researcher can read and pass on.

Per model: a verdict sentence, the findings in plain words (what, where, how strong, how much
attention), the figures embedded as base64 PNGs with a caption under each, the per-layer table with
named columns, the top outliers and massive activations, and the raw summary keys folded away.
Values that were not measured (``null`` in report.json) read "not measured".
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path

__all__ = ["render", "verdict", "findings"]

NOT_MEASURED = "not measured"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1150px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2.5rem; border-bottom: 2px solid #ddd; }
h3 { font-size: 1rem; margin-top: 1.5rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
td, th { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.k, th.k { text-align: left; font-weight: 600; white-space: nowrap; }
table.findings td { text-align: left; } table.findings { max-width: 100%; font-size: 0.92rem; }
.verdict { font-size: 1.05rem; padding: 0.6rem 1rem; border-radius: 6px; margin: 0.6rem 0; }
.bad { background: #fde2e1; border-left: 6px solid #d33; } .good { background: #e2f5e4; border-left: 6px solid #2a2; }
.unsure { background: #fff4d6; border-left: 6px solid #c90; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; display: block; }
figcaption { font-size: 0.85rem; color: #444; max-width: 900px; margin-top: 0.3rem; }
figcaption b { color: #222; } .na { color: #999; font-style: italic; }
code { background: #f6f6f6; padding: 0 0.2rem; } details { margin: 1rem 0; } summary { cursor: pointer; }
ul.toc { padding-left: 1.2rem; }
"""


# -- numbers in words --------------------------------------------------------------------------------
def _pct(value: float | None, digits: int = 1) -> str:
    return NOT_MEASURED if value is None else f"{100 * value:.{digits}f} %"


def _times(value: float | None, digits: int = 1) -> str:
    return NOT_MEASURED if value is None else f"{value:.{digits}f}×"


def _span(layers: list[int]) -> str:
    """Layers as words: 'layer 3', 'layers 6 to 10' (contiguous) or 'layers 2, 5, 9'."""
    if not layers:
        return "no layer"
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]} to {layers[-1]}"
    return "layers " + ", ".join(str(x) for x in layers)


def _peak_ratio(report: dict) -> float | None:
    return max((o["ratio"] for o in report["outliers"]), default=None)


def _worst_ratio(report: dict) -> float | None:
    return max((row["max_ratio_worst"] for row in report["layers"] if row.get("max_ratio_worst") is not None), default=None)


def _unit(report: dict, one: bool = False) -> str:
    if report["modality"] == "vision":
        return "patch" if one else "patches"
    return "token" if one else "tokens"


def _attention_measured(report: dict) -> bool:
    return report["settings"].get("attention", True) is not False


def _outlier_sentence(report: dict) -> str:
    s = report["summary"]
    layers = s.get("outlier_layers") or []
    floor = report["settings"]["rule"]["floor"]
    if not layers:
        worst = _worst_ratio(report)
        if worst is None:
            return f"none (no {_unit(report)} to compare)"
        return f"none: the largest {_unit(report, one=True)} norm is {_times(worst, 2)} the median of its input (an outlier needs {floor:g}× or more)"
    text = f"from {_span(layers)}, {_pct(s.get('outlier_fraction'))} of {_unit(report)}, up to {_times(_peak_ratio(report))} the median norm"
    if s.get("max_ratio") is not None:
        text += f" (typical input: {_times(s['max_ratio'])})"
    if len(layers) < 2:
        text += "; at a single layer only, so not counted as persistent artifacts"
    return text


# -- the verdict -------------------------------------------------------------------------------------
def verdict(report: dict) -> tuple[str, str]:
    """A one-sentence verdict and its CSS class (bad / good / unsure)."""
    s = report["summary"]
    found = s.get("has_artifacts")
    if found is None:
        return "Not enough to judge: too little was measured for a verdict (see the rows below).", "unsure"
    if report["modality"] == "vision":
        if found:
            return (f"Artifacts found: high-norm outlier tokens from {_span(s['outlier_layers'])}, "
                    f"{_pct(s.get('outlier_fraction'))} of patches, up to {_times(_peak_ratio(report))} the median norm."), "bad"
        worst = _worst_ratio(report)
        tail = f" every patch stays within {_times(worst, 2)} of its image's median norm." if worst is not None else ""
        if s.get("outlier_layers"):
            tail = f" outlier patches at {_span(s['outlier_layers'])} only; artifacts persist over at least 2 layers."
        return "No artifacts found:" + tail, "good"
    reasons = []
    if s.get("has_first_token_sink"):
        reasons.append(f"a first-token attention sink (up to {_pct(s.get('first_token_attention_max'), 0)} of attention)")
    if s.get("has_massive_activations"):
        top = max(report["massive_activations"], key=lambda m: abs(m["value"]), default=None)
        reasons.append("massive activations" + (f" (up to {abs(top['value']):,.0f} at token {top['token']})" if top else ""))
    if s.get("has_outliers"):
        reasons.append(f"high-norm outlier tokens from {_span(s['outlier_layers'])} (up to {_times(_peak_ratio(report))} the median norm)")
    if found:
        return "Artifacts found: " + _join(reasons or ["see below"]) + ".", "bad"
    if s.get("first_token_attention_max") is None:
        return (f"No artifacts found in what was measured: no massive activations, no persistent outlier tokens; "
                f"the first-token sink was {_why_missing(report)}."), "unsure"
    return "No artifacts found: no first-token sink, no massive activations, no persistent outlier tokens.", "good"


def _why_missing(report: dict) -> str:
    if not _attention_measured(report):
        return "not measured (the scan ran without attention, --no-attention)"
    return "not measured (no token had enough earlier tokens to measure it)"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# -- findings in plain words -------------------------------------------------------------------------
def findings(report: dict) -> list[tuple[str, str]]:
    """(label, sentence) rows: the summary in words, ``not measured`` where report.json holds null."""
    rows = [("Inputs", _inputs_sentence(report))]
    rows += _vision_rows(report) if report["modality"] == "vision" else _text_rows(report)
    return rows


def _inputs_sentence(report: dict) -> str:
    inputs = report["inputs"]
    if report["modality"] == "vision":
        sizes = sorted({tuple(i["image_size"]) for i in inputs if i.get("image_size")})
        size = ", ".join(f"{h}×{w} px" for h, w in sizes)
        return f"{len(inputs)} image(s), {size}, {inputs[0]['tokens']} tokens each" if inputs else "none"
    counts = [i["tokens"] for i in inputs]
    return f"{len(inputs)} text(s), {min(counts)} to {max(counts)} tokens" if len(set(counts)) > 1 else f"{len(inputs)} text(s), {counts[0]} tokens"


def _vision_rows(report: dict) -> list[tuple[str, str]]:
    s = report["summary"]
    rows = [("Outlier tokens", _outlier_sentence(report))]
    if s.get("peak_layer") is not None:
        peak = next(row for row in report["layers"] if row["layer"] == s["peak_layer"])
        rows.append(("Peak layer", f"layer {s['peak_layer']}: {_pct(peak['outlier_fraction'])} of patches are outliers"))
        where = NOT_MEASURED if s.get("border_fraction") is None else (
            f"{_pct(s['border_fraction'], 0)} on the image border (a random patch: {_pct(s.get('border_fraction_expected'), 0)}), "
            f"{_pct(s.get('corner_fraction'), 0)} in a corner")
        rows.append(("Where they sit", where))
        ns = s.get("neighbor_similarity") or {}
        if ns.get("outliers") is None:
            rows.append(("Redundant patches?", NOT_MEASURED))
        else:
            more = "more" if ns["outliers"] > (ns.get("others") or 0) else "no more"
            rows.append(("Redundant patches?", f"outlier patches resemble their 4 neighbours {more} than others do: input-embedding "
                                                f"cosine {ns['outliers']:.2f} vs {ns.get('others') or 0:.2f} (artifacts take redundant background patches)"))
        if s.get("sink_share") is None:
            rows.append(("Attention they draw", _why_missing(report) if not _attention_measured(report) else "none (no outliers after the first outlier layer)"))
        else:
            rows.append(("Attention they draw", f"after layer {s['first_outlier_layer']}, the other tokens send {_pct(s['sink_share'])} of "
                                                f"their attention to the outliers; CLS sends {_pct(s.get('sink_share_cls'))}"))
    for group, name in (("registers_norm_ratio", "Trained registers"), ("appended_norm_ratio", "Test-time registers")):
        ratios = [row[group] for row in report["layers"] if row.get(group) is not None]
        if ratios:
            rows.append((name, f"median norm up to {_times(max(ratios))} the median patch norm (they carry what artifacts carried)"))
    rows.append(("Massive activations", _massive_sentence(report)))
    return rows


def _text_rows(report: dict) -> list[tuple[str, str]]:
    s = report["summary"]
    rows = []
    top = s.get("first_token_attention_max")
    if top is None:
        rows.append(("First-token sink", _why_missing(report)))
    else:
        sinks = [row["layer"] for row in report["layers"] if (row.get("first_token_attention") or 0) >= 0.3]
        peak = max((row for row in report["layers"] if row.get("first_token_attention") is not None),
                   key=lambda row: row["first_token_attention"], default=None)
        at = f" (layer {peak['layer']})" if peak is not None else ""
        where = f"; 30 % or more in {_span(sinks)}" if sinks else ""
        rows.append(("First-token sink", f"{'yes' if s.get('has_first_token_sink') else 'no'}: up to {_pct(top, 0)} of attention lands on the "
                                         f"first token{at}, {_pct(s.get('sink_share'), 0)} on average over layers{where}"))
    eps = report["settings"].get("epsilon")
    rows.append(("Sink heads (Sink_ε)", _why_missing(report) if s.get("sink_epsilon") is None else
                 f"{_pct(s['sink_epsilon'], 0)} of (input, layer, head) give the first token more than {eps:g} of their attention on average"))
    rows.append(("Massive activations", _massive_sentence(report)))
    rows.append(("Outlier tokens", _outlier_sentence(report)))
    words = s.get("secondary_outliers") or []
    if words:
        rows.append(("Which tokens", "; ".join(
            f"{w['text']!r} {w['count']}× ({_span(w['layers'])}, up to {_times(w['max_ratio'])})" for w in words[:5])))
    return rows


def _massive_sentence(report: dict) -> str:
    massive = report["massive_activations"]
    s = report["settings"]
    if not massive:
        return f"none (|a| > {s['massive_abs']:g} and > {s['massive_rel']:g}× the layer's median)"
    tokens = sorted({m["token"] for m in massive})
    channels = sorted({m["channel"] for m in massive})
    top = max(massive, key=lambda m: abs(m["value"]))
    return (f"at token(s) {', '.join(map(str, tokens[:8]))}{'…' if len(tokens) > 8 else ''} in channel(s) "
            f"{', '.join(map(str, channels[:8]))}{'…' if len(channels) > 8 else ''}, {_span(sorted({m['layer'] for m in massive}))}; "
            f"largest {top['value']:,.0f} (layer {top['layer']}, token {top['token']}, channel {top['channel']})")


# -- tables ------------------------------------------------------------------------------------------
NOT_APPLICABLE = '<span class="na" title="does not apply (e.g. no outlier tokens to attend to)">–</span>'
_ATTENTION_KEYS = {"first_token_attention", "sink_epsilon", "outlier_attention_share", "outlier_attention_share_cls",
                   "outlier_attention_share_patches", "alpha0_per_head", "sink_share", "sink_share_cls", "first_token_attention_max"}


def _missing(key: str, measured: bool) -> str:
    """A null cell: 'not measured' when attention was off and this is an attention quantity, else 'does not apply'."""
    return f'<span class="na">{NOT_MEASURED}</span>' if key in _ATTENTION_KEYS and not measured else NOT_APPLICABLE


def _cell(value) -> str:
    if value is None:
        return NOT_APPLICABLE
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value)[:200])
    return html.escape(str(value))


Column = tuple[str, str, Callable]  # (header, key, formatter)


def _table(rows: list[dict], columns: list[Column], measured: bool = True) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_missing(key, measured) if row.get(key) is None else fmt(row.get(key))}</td>" for _, key, fmt in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value) -> str:
    return _cell(value)


def _percent(value) -> str:
    return f"{100 * value:.2f} %"


def _ratio(value) -> str:
    return f"{value:.2f}×"


def _layers(value) -> str:
    return html.escape(_span(list(value)))


def _text(value) -> str:
    return html.escape(repr(value) if isinstance(value, str) else str(value))


def _layer_columns(modality: str) -> list[Column]:
    columns = [("layer", "layer", _num), ("median norm", "norm_median", _num), ("max norm", "norm_max", _num),
               ("max / median", "max_ratio", _ratio), ("max / median, worst input", "max_ratio_worst", _ratio),
               ("outlier tokens", "outlier_fraction", _percent)]
    if modality == "vision":
        return columns + [("attention to outliers, from CLS", "outlier_attention_share_cls", _percent),
                          ("from patches", "outlier_attention_share_patches", _percent)]
    return columns + [("first-token attention", "first_token_attention", _percent), ("Sink_ε heads", "sink_epsilon", _percent)]


# -- the page ----------------------------------------------------------------------------------------
def _figure(name: str, caption: str, root: Path | None, prefix: str) -> str:
    path = f"{prefix}/{name}" if prefix else name
    src = html.escape(path)
    if root is not None:
        src = "data:image/png;base64," + base64.b64encode((root / path).read_bytes()).decode("ascii")
    return (f'<figure><img src="{src}" alt="{html.escape(name)}">'
            f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>")


def _section(report: dict, anchor: str, root: Path | None, prefix: str) -> str:
    s = report["summary"]
    sentence, cls = verdict(report)
    rows = "".join(f"<tr><td class=k>{html.escape(label)}</td><td>{html.escape(text)}</td></tr>" for label, text in findings(report))
    captions = report.get("figure_captions") or {}
    figures = "".join(_figure(name, captions.get(name, ""), root, prefix) for name in report.get("figures", []))
    top = sorted(report["outliers"], key=lambda o: -o["ratio"])[:30]
    out_cols: list[Column] = [("input", "input", _num), ("layer", "layer", _num), ("token", "token", _num),
                              ("norm", "norm", _num), ("norm / median", "ratio", _ratio)]
    out_cols += [("row", "row", _num), ("column", "col", _num)] if report["modality"] == "vision" else [("text", "text", _text)]
    words = ""
    if report["modality"] == "text" and s.get("secondary_outliers"):
        words = "<h3>Outlier tokens by text</h3>" + _table(s["secondary_outliers"], [
            ("token", "text", _text), ("times", "count", _num), ("layers", "layers", _layers), ("up to (norm / median)", "max_ratio", _ratio)])
    massive = sorted(report["massive_activations"], key=lambda m: -abs(m["value"]))[:20]
    massive_cols: list[Column] = [("input", "input", _num), ("layer", "layer", _num), ("token", "token", _num),
                                  ("channel", "channel", _num), ("value", "value", _num)]
    measured = _attention_measured(report)
    raw = "".join(f"<tr><td class=k>{html.escape(k)}</td><td>{_missing(k, measured) if v is None else _cell(v)}</td></tr>" for k, v in s.items())
    return f"""
<section id="{html.escape(anchor)}">
<h2>{html.escape(report['model'])} ({html.escape(report['modality'])}, {len(report['inputs'])} inputs)</h2>
<p class="verdict {cls}">{html.escape(sentence)}</p>
<table class="findings">{rows}</table>
<p>Outlier rule: <code>{html.escape(report['settings']['rule']['text'])}</code>; a layer counts when at least
{_pct(report['settings'].get('min_fraction', 0.002))} of its {_unit(report)} are outliers.</p>
<h3>Figures</h3>{figures or '<p>none</p>'}
<h3>Per layer</h3>{_table(report['layers'], _layer_columns(report['modality']), _attention_measured(report))}
{words}
<h3>Top outlier tokens</h3>{_table(top, out_cols) if top else '<p>none</p>'}
<h3>Massive activations</h3>{_table(massive, massive_cols) if massive else '<p>none</p>'}
<details><summary>Summary as stored in report.json</summary><table>{raw}</table></details>
</section>"""


def render(reports: list[tuple[dict, str]], root: str | Path | None = None) -> str:
    """One page for one or more reports; ``reports`` pairs a report dict with the folder prefix of its figures.

    With ``root`` (the folder holding the figures) the PNGs are embedded as data URIs: the page is one
    self-contained file. Without it, images are linked by relative path.
    """
    root = Path(root) if root is not None else None
    sections, toc = [], []
    for report, prefix in reports:
        anchor = report["model"].replace("/", "_")
        sections.append(_section(report, anchor, root, prefix))
        sentence, _ = verdict(report)
        toc.append(f'<li><a href="#{html.escape(anchor)}">{html.escape(report["model"])}</a>: {html.escape(sentence)}</li>')
    version = reports[0][0]["sinkless_version"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>sinkless scan</title><style>{_STYLE}</style></head>
<body><h1>sinkless scan report</h1>
<p>sinkless {html.escape(version)} · high-norm tokens, attention sinks and massive activations, layer by layer.</p>
<ul class="toc">{''.join(toc)}</ul>
{''.join(sections)}
</body></html>
"""
