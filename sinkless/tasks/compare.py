"""Before/after on the tasks that matter: one task, one data set, the model under each fix.

``compare(model, task, data, fixes)`` loads the model and the data, builds every fix first (so an
unknown or unbuilt fix fails before any work), then evaluates the task once per fix with the same
protocol, and returns a ``Comparison`` that serialises to the JSON of ``sinkless compare --json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sinkless._version import __version__
from sinkless.errors import SinklessError
from sinkless.tasks import lost, probe, uncertainty, zeroseg
from sinkless.tasks._features import check_vision, resolve_layer
from sinkless.tasks.data import Dataset, open_dataset
from sinkless.tasks.fixes import FIXES, edits_reach, make_fix

__all__ = ["Task", "TASKS", "FixResult", "Comparison", "compare", "make_protocol", "write_pictures"]

log = logging.getLogger(__name__)

PREPROCESSING = (
    "keep aspect ratio, bicubic downscale to max_side when larger, model mean/std normalisation, "
    "zero padding (the mean colour) bottom/right to a multiple of the patch size"
)


@dataclass(frozen=True)
class Task:
    """A task: its protocol settings, its evaluation and its headline metric."""

    name: str
    protocol: type
    evaluate: Callable
    metric: str
    description: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("lost", lost.LostProtocol, lost.evaluate, "corloc", "LOST single-object discovery, CorLoc (%)"),
        Task("zeroseg", zeroseg.ZeroSegProtocol, zeroseg.evaluate, "miou", "zero-shot segmentation from CLS attention, fg/bg mIoU (%)"),
        Task("probe", probe.ProbeProtocol, probe.evaluate, "miou", "linear probe on patches (mIoU %) and k-NN on CLS (accuracy %)"),
    )
}


@dataclass
class FixResult:
    fix: str
    n_images: int
    seconds: float  # the task's evaluation (feature extraction included), under this fix
    setup_seconds: float  # building the fix (calibration)
    metrics: dict
    per_image: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what the fix used (e.g. ttr's neurons)
    # sinkless.tasks.uncertainty: ci95 of the headline metric over the images, vs_none the paired difference to `none`
    uncertainty: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"fix": self.fix, **self.metrics, **self.uncertainty, "n_images": self.n_images, "seconds": round(self.seconds, 3),
                "setup_seconds": round(self.setup_seconds, 3), "fix_settings": self.settings, "per_image": self.per_image}


@dataclass
class Comparison:
    model: str
    task: str
    data: str
    dataset: dict
    protocol: dict
    results: list[FixResult]
    metric: str
    sinkless_version: str = __version__
    torch_threads: int = 1
    seconds: float = 0.0
    precision: dict = field(default_factory=dict)  # the model's dtype and device (they move the scores)

    def to_json(self) -> dict:
        return {
            "sinkless_version": self.sinkless_version,
            "model": self.model,
            "task": self.task,
            "data": self.data,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "precision": self.precision,
            "metric": self.metric,
            "results": [r.to_json() for r in self.results],
            "timing": {"total_seconds": round(self.seconds, 3), "torch_threads": self.torch_threads},
        }


def make_protocol(task: Task, overrides: dict | None = None):
    """The task's protocol with ``overrides`` (None values ignored); a clear error for options of other tasks."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = {f.name for f in dataclasses.fields(task.protocol)}
    foreign = sorted(set(given) - names)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise SinklessError(f"{flags} does not apply to --task {task.name}", fix=f"options of {task.name}: {', '.join(sorted(names))}")
    return task.protocol(**given)


def _note_unreached(fix: str, info: dict | None, loaded, task: str, recorded: dict) -> None:
    """A fix that rewrites features (DVT) but none that ``task`` reads: warn, and say so in the row's settings."""
    if not info or "edits" not in info:
        return
    last = loaded.adapter.num_layers(loaded.model) - 1
    if task == "lost":
        kind, layer = recorded["features"], recorded["layer"]
        what = f"layer {layer}'s {kind}"
    elif task == "zeroseg":
        kind, layer, what = "attention", last, "the last layer's CLS attention"
    else:
        kind, layer, what = "output", last, "the final output features"
    if edits_reach(info["edits"], kind, layer):
        return
    edited = ", ".join("the final output" if e["features"] == "output" else f"layer {e['layer']}'s {e['features']}" for e in info["edits"])
    if kind in ("keys", "attention"):
        hint = (f"to denoise layer {layer}'s keys (and the attention computed from them) train a keys denoiser "
                f"(`sinkless denoise --train-denoiser --features keys --layer {layer}`) and pass it with --denoiser")
    elif kind == "tokens":
        hint = (f"to denoise layer {layer}'s output train a denoiser on it (`sinkless denoise --train-denoiser --features "
                f"residual --layer {layer}`) and pass it with --denoiser")
    else:
        hint = f"no DVT site rewrites the {kind}: read the keys or tokens instead (--features)"
    note = f"--fix {fix} leaves what {task} reads ({what}) unchanged: it rewrites {edited}, so its row equals none by construction; {hint}"
    info["note"] = note
    log.warning(note)


def compare(
    model,
    task: str,
    data: str | Dataset,
    fixes: Sequence[str] = ("none",),
    *,
    overrides: dict | None = None,
    limit: int | None = None,
    progress: bool = True,
    visuals: bool = False,
    fix_options: dict[str, dict] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    resamples: int = uncertainty.RESAMPLES,
) -> tuple[Comparison, dict]:
    """Evaluate ``task`` on ``data`` for ``model`` (a zoo name, hub id, folder, ``Loaded`` or model object) under each fix.

    Returns the comparison and, when ``visuals``, qualitative pictures ``{"<fix>/<image>.png": PIL image}``.
    ``resamples``: bootstrap resamples of the images for each row's interval (``sinkless.tasks.uncertainty``; 0: none).
    """
    from sinkless import zoo

    spec = TASKS.get(task)
    if spec is None:
        raise SinklessError(f"unknown task {task!r}", fix=f"choose from {', '.join(TASKS)}")
    if not fixes:
        raise SinklessError("no fix given", fix="pass --fix none (and the fixes to compare)")
    if resamples < 0:
        raise SinklessError(f"resamples must be >= 0, got {resamples}", fix="pass 0 to skip the intervals, or e.g. 2000")
    if len(set(fixes)) != len(fixes):
        raise SinklessError(f"a fix is repeated in {list(fixes)}", fix="name each fix once")
    unknown = [name for name in fixes if name not in FIXES]
    if unknown:
        raise SinklessError(f"unknown fix {unknown[0]!r}", fix=f"choose from {', '.join(FIXES)}")
    protocol = make_protocol(spec, overrides)
    dataset = data if isinstance(data, Dataset) else open_dataset(data)
    dataset = dataset.limit(limit)
    loaded = zoo.loaded_from(model, device=device, dtype=dtype)
    first = next(loaded.model.parameters())
    check_vision(loaded, spec.name)
    started = time.perf_counter()
    contexts = []
    for name in fixes:  # build every fix before evaluating any, so a bad one fails early
        t0 = time.perf_counter()
        contexts.append((name, make_fix(name, loaded, dataset.images(), **(fix_options or {}).get(name, {})), time.perf_counter() - t0))
    recorded = dataclasses.asdict(protocol)
    if "layer" in recorded:
        recorded["layer"] = resolve_layer(loaded, protocol.layer)
    for name, context, _ in contexts:
        _note_unreached(name, getattr(context, "info", None), loaded, spec.name, recorded)
    recorded.update(task=spec.name, preprocessing=PREPROCESSING, patch_size=loaded.adapter.patch_size(loaded.model))
    if spec.name == "zeroseg":
        recorded.update(attention="last layer, CLS query, mean over heads, patch columns only (renormalised)")
    results, pictures = [], {}
    for name, context, setup in contexts:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with context as entered:
            # a fix may hand over another model to evaluate (e.g. one retrained with registers)
            target = entered if isinstance(entered, zoo.Loaded) else loaded
            score = spec.evaluate(target, dataset, protocol, progress=progress, visuals=visuals)
        seconds = time.perf_counter() - t0
        log.info("%s %s under fix %s: %s = %.2f (%d images, %.1f s)", loaded.name, task, name, spec.metric,
                 getattr(score, spec.metric), score.n_images, seconds)
        results.append(FixResult(name, score.n_images, seconds, setup, score.metrics(), score.per_image, getattr(context, "info", {})))
        pictures.update({f"{name}/{image}.png": picture for image, picture in score.visuals.items()})
    if resamples:
        rows = [{"fix": r.fix, **r.metrics, "per_image": r.per_image} for r in results]
        intervals = uncertainty.annotate(spec.name, rows, spec.metric, resamples=resamples)
        for r in results:
            r.uncertainty = intervals.get(r.fix, {})
    data_name = data if isinstance(data, str) else dataset.name
    comparison = Comparison(
        loaded.name, spec.name, str(data_name), dataset.describe(), recorded, results, spec.metric,
        torch_threads=torch.get_num_threads(), seconds=time.perf_counter() - started,
        precision={"dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device)},
    )
    return comparison, pictures


def write_pictures(pictures: dict, out_dir: str | Path) -> None:
    """Write qualitative pictures into ``out_dir`` all at once (nothing is left behind on failure)."""
    from sinkless._io import staged_dir

    with staged_dir(out_dir, kind="compare-pictures") as stage:
        for relative, picture in pictures.items():
            target = stage / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            picture.save(target)
