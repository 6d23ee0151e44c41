"""``sinkless compare-attn``: one table (and one figure) of several ``train-attn`` runs side by side.

Each run folder's ``result.json`` gives a row: variant, budget, held-out loss / perplexity, the sink
metrics (first-token attention: mean over layers, max, in the deep half; Sink_ε; largest activation and
its ratio to the median; outlier tokens) and, for fine-tunes, the same before training. The figure
shows the loss curves and the first-token attention per layer of every run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sinkless._io import atomic_path, atomic_write_json
from sinkless._version import __version__
from sinkless.attention.train import RESULT
from sinkless.errors import SinklessError

__all__ = ["Run", "read_runs", "table_rows", "format_table", "plot_runs", "compare_runs"]


@dataclass
class Run:
    folder: Path
    result: dict

    @property
    def label(self) -> str:
        return f"{self.result['variant']}" + (f" ({self.result['from']})" if self.result.get("from") else "")


def read_runs(folders: list[str | Path]) -> list[Run]:
    """The runs' results; a folder without a readable ``result.json`` is an error naming it."""
    if not folders:
        raise SinklessError("no run folders given", fix="pass folders written by `sinkless train-attn --out DIR`")
    runs = []
    for folder in map(Path, folders):
        path = folder / RESULT
        if not path.is_file():
            raise SinklessError(f"{folder} holds no {RESULT}", fix="pass folders of finished `sinkless train-attn` runs")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["variant"], data["metrics"]  # noqa: B018 - the fields every row needs
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise SinklessError(f"{path} is not a train-attn result ({type(error).__name__}: {error})", fix="re-run train-attn into a new folder") from None
        runs.append(Run(folder, data))
    return runs


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None


def _deep(metrics: dict, from_layer: int | None) -> float | None:
    """Mean first-token attention over layers >= ``from_layer`` (default: the deeper half)."""
    layers, values = metrics["layers"], metrics["first_token_attention"]
    start = from_layer if from_layer is not None else layers[len(layers) // 2]
    return _mean(v for layer, v in zip(layers, values) if layer >= start)


def table_rows(runs: list[Run], *, deep_from: int | None = None) -> list[dict]:
    """One dict per run with the compared numbers (before -> after for fine-tunes)."""
    rows = []
    for run in runs:
        r, m = run.result, run.result["metrics"]
        before = r.get("metrics_before") or {}
        ev, ev0 = r.get("eval") or {}, r.get("eval_before") or {}
        rows.append({
            "run": str(run.folder),
            "variant": r["variant"],
            "task": r.get("task"),
            "from": r.get("from"),
            "steps": r.get("steps_done"),
            "train_seconds": r.get("train_seconds"),
            "eval_loss": ev.get("eval_loss"),
            "eval_ppl": ev.get("eval_ppl"),
            "eval_accuracy": ev.get("eval_accuracy"),
            "eval_ppl_before": ev0.get("eval_ppl") if r.get("from") else None,
            "first_token_attention_mean": _mean(m["first_token_attention"]),
            "first_token_attention_max": m.get("first_token_attention_max"),
            "first_token_attention_deep": _deep(m, deep_from),
            "first_token_attention_deep_before": _deep(before, deep_from) if before else None,
            "sink_epsilon": m.get("sink_epsilon_mean"),
            "max_activation": m.get("max_activation"),
            "max_activation_before": before.get("max_activation"),
            "max_activation_ratio": m.get("max_activation_ratio"),
            "outlier_tokens": m.get("outlier_tokens"),
            "has_first_token_sink": m.get("has_first_token_sink"),
        })
    return rows


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_table(rows: list[dict], *, deep_from: int | None = None) -> str:
    """A plain-text table (Markdown-compatible) of ``table_rows``."""
    deep = f"L>={deep_from}" if deep_from is not None else "deep half"
    finetune = any(row["from"] for row in rows)
    head = ["run", "variant", "steps", "held-out loss", "ppl" if rows and rows[0]["eval_ppl"] is not None else "accuracy",
            "first-tok attn mean", "max", deep, "Sink_eps", "largest act", "act/median", "outlier tokens", "sink?"]
    lines = []
    for row in rows:
        quality = row["eval_ppl"] if row["eval_ppl"] is not None else row["eval_accuracy"]
        deep_cell = _fmt(row["first_token_attention_deep"])
        act = _fmt(row["max_activation"], ".1f")
        if finetune:
            quality = f"{_fmt(row['eval_ppl_before'], '.2f')} -> {_fmt(quality, '.2f')}"
            deep_cell = f"{_fmt(row['first_token_attention_deep_before'])} -> {deep_cell}"
            act = f"{_fmt(row['max_activation_before'], '.1f')} -> {act}"
        else:
            quality = _fmt(quality, ".2f")
        lines.append([Path(row["run"]).name, row["variant"], _fmt(row["steps"], "d"), _fmt(row["eval_loss"], ".4f"), quality,
                      _fmt(row["first_token_attention_mean"]), _fmt(row["first_token_attention_max"]), deep_cell,
                      _fmt(row["sink_epsilon"], ".2f"), act, _fmt(row["max_activation_ratio"], ".0f"), _fmt(row["outlier_tokens"], "d"),
                      _fmt(row["has_first_token_sink"])])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)


def plot_runs(runs: list[Run], path: str | Path) -> Path:
    """Loss curves (left) and first-token attention per layer (right) of every run, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        curve = run.result.get("loss_curve") or []
        left.plot([row["step"] for row in curve], [row["loss"] for row in curve], label=run.label)
        m = run.result["metrics"]
        right.plot(m["layers"], [v if v is not None else float("nan") for v in m["first_token_attention"]], marker="o", label=run.label)
    left.set(xlabel="step", ylabel="training loss", title="loss")
    right.set(xlabel="layer", ylabel="attention share on the first token", title="first-token attention", ylim=(0, 1))
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


def compare_runs(folders: list[str | Path], *, plot: str | Path | None = None, json_out: str | Path | None = None,
                 deep_from: int | None = None) -> tuple[str, list[dict]]:
    """Read the runs, return (the table as text, its rows); optionally write the figure and a JSON of the rows."""
    for target in (plot, json_out):
        if target is not None:
            parent = Path(target).resolve().parent
            if not parent.is_dir():
                raise SinklessError(f"cannot write {target}: folder {parent} does not exist", fix="create it or choose another path")
    runs = read_runs(folders)
    tasks = sorted({str(run.result.get("task")) for run in runs})
    if len(tasks) > 1:  # one table has one metric column: perplexity for lm runs, accuracy for vit runs
        raise SinklessError(f"these runs are of different tasks ({', '.join(tasks)}): one table compares one task",
                            fix="run compare-attn once per task")
    if deep_from is not None and deep_from < 0:
        raise SinklessError(f"--deep-from must be >= 0, got {deep_from}", fix="the first layer counted as deep, from 0")
    rows = table_rows(runs, deep_from=deep_from)
    text = format_table(rows, deep_from=deep_from)
    if plot is not None:
        plot_runs(runs, plot)
    if json_out is not None:
        atomic_write_json(json_out, {"sinkless_version": __version__, "deep_from": deep_from, "runs": rows})
    return text, rows
