"""The HTML page of a scan: the summary table, per-layer table, the figures and the top outliers."""

from __future__ import annotations

import html
import json

__all__ = ["render"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
td, th { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; } td.k { text-align: left; font-weight: 600; }
.verdict { font-size: 1.1rem; padding: 0.6rem 1rem; border-radius: 6px; display: inline-block; }
.bad { background: #fde2e1; } .good { background: #e2f5e4; }
figure { display: inline-block; margin: 0.5rem; } figure img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2rem; }
"""


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value)[:200])
    return html.escape(str(value))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(report: dict, anchor: str) -> str:
    s = report["summary"]
    verdict = "artifacts found" if s["has_artifacts"] else "no artifacts found"
    cls = "bad" if s["has_artifacts"] else "good"
    keys = [k for k in s if k not in ("secondary_outliers", "massive_tokens", "outlier_layers")]
    summary = "".join(f"<tr><td class=k>{html.escape(k)}</td><td>{_fmt(s[k])}</td></tr>" for k in keys)
    columns = ["layer", "norm_median", "norm_max", "max_ratio", "outlier_fraction"]
    columns += ["outlier_attention_share_cls", "outlier_attention_share_patches"] if report["modality"] == "vision" else ["first_token_attention", "sink_epsilon"]
    figures = "".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name in report.get("figures", [])
    )
    top = sorted(report["outliers"], key=lambda o: -o["ratio"])[:30]
    out_cols = ["input", "layer", "token", "norm", "ratio"] + (["row", "col"] if report["modality"] == "vision" else ["text"])
    extra = ""
    if report["modality"] == "text" and s.get("secondary_outliers"):
        extra = "<h3>Secondary outlier tokens</h3>" + _table(s["secondary_outliers"], ["text", "count", "layers", "max_ratio"])
    massive = sorted(report["massive_activations"], key=lambda m: -abs(m["value"]))[:20]
    return f"""
<section id="{anchor}">
<h2>{html.escape(report['model'])} ({report['modality']}, {len(report['inputs'])} inputs)</h2>
<p class="verdict {cls}">{verdict}</p>
<table>{summary}</table>
<p>Outlier rule: <code>{html.escape(report['settings']['rule']['text'])}</code></p>
<h3>Figures</h3>{figures}
<h3>Per layer</h3>{_table(report['layers'], columns)}
{extra}
<h3>Top outlier tokens</h3>{_table(top, out_cols) if top else '<p>none</p>'}
<h3>Massive activations</h3>{_table(massive, ['input', 'layer', 'token', 'channel', 'value']) if massive else '<p>none</p>'}
</section>"""


def render(reports: list[tuple[dict, str]]) -> str:
    """One page for one or more reports; ``reports`` pairs a report dict with the folder prefix of its figures."""
    sections = []
    for report, prefix in reports:
        if prefix:
            report = {**report, "figures": [f"{prefix}/{name}" for name in report.get("figures", [])]}
        sections.append(_section(report, report["model"].replace("/", "_")))
    version = reports[0][0]["sinkless_version"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sinkless scan</title><style>{_STYLE}</style></head>
<body><h1>sinkless scan report</h1>
<p>sinkless {html.escape(version)} · high-norm tokens, attention sinks and massive activations, layer by layer.</p>
{''.join(sections)}
</body></html>
"""
