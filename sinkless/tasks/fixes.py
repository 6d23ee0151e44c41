"""The artifact fixes a task can be compared under: a registry of context-manager factories.

A fix is ``factory(loaded, images) -> AbstractContextManager``. ``images`` are the evaluation
images (a lazy sequence of PIL images) for fixes that calibrate on data. While the context is
entered the fix is applied to ``loaded.model`` (hooks from ``sinkless.hooks``, module swaps...) and
it is undone on exit, exception or not. ``__enter__`` returns ``None`` to evaluate ``loaded`` as
modified, or a ``Loaded`` to evaluate instead (e.g. a model retrained with registers). Fixes may
append tokens after the patches: the tasks select tokens through the adapter layout, so they
never see them.

A new fix is one ``register_fix`` call (or one entry in ``FIXES``); the task code does not change.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from PIL import Image

from sinkless.errors import SinklessError

__all__ = ["FixFactory", "FIXES", "register_fix", "fix_names", "make_fix"]

log = logging.getLogger(__name__)

FixFactory = Callable[[object, Sequence[Image.Image]], AbstractContextManager]


def _none(loaded, images) -> AbstractContextManager:
    """The model as it is."""
    return contextlib.nullcontext()


class _Applied(contextlib.AbstractContextManager):
    """A fix's context manager plus what the result should record about it (``info``)."""

    def __init__(self, context: AbstractContextManager, info: dict) -> None:
        self.context, self.info = context, info

    def __enter__(self):
        return self.context.__enter__()

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def _ttr(loaded, images, registers: str | None = None) -> AbstractContextManager:
    """Test-time registers (Jiang et al. 2025): the neurons of a `sinkless fix` file, or found on the bundled photos."""
    from sinkless.registers import TestTimeRegisters, discover, load_neurons
    from sinkless.registers.inputs import discovery_inputs

    if registers:
        neurons, source = load_neurons(registers), registers
    else:  # discovery never looks at the evaluation images: crops of the bundled photos, 16 more held out
        inputs, heldout = discovery_inputs(loaded, [], [], 48, 16)
        neurons, source = discover(loaded, inputs, heldout, progress=False), "found on 48 bundled photo crops"
    info = {"neurons": {str(k): v for k, v in neurons.by_layer().items()}, "top_k": neurons.top_k, "source": source}
    return _Applied(TestTimeRegisters(loaded, neurons)(), info)


class _Swap(contextlib.AbstractContextManager):
    """Evaluate another model (e.g. one trained with registers): ``__enter__`` returns its ``Loaded``."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded

    def __enter__(self):
        return self.loaded

    def __exit__(self, *exc):
        return None


def _with_registers(path: str, flag: str, loaded):
    """A model folder / hub id that carries trained registers, loaded through the zoo (which restores them) on
    ``loaded``'s device and in its precision, and checked to be ``loaded``'s architecture with registers."""
    from sinkless import zoo

    first = next(loaded.model.parameters())
    other = zoo.load(path, dtype=first.dtype, device=first.device)
    if other.adapter.modality.value != "vision" or other.adapter.n_registers(other.model) == 0:
        raise SinklessError(
            f"{flag} {path}: this {type(other.model).__name__} has no register tokens",
            fix="pass the folder written by `sinkless distill`, an add_registers model, or a DINOv2-with-registers checkpoint",
        )
    shape = {"blocks": lambda x: x.adapter.num_layers(x.model), "patch size": lambda x: x.adapter.patch_size(x.model),
             "width": lambda x: x.model.config.hidden_size}
    differ = [f"{what} {get(other)} vs {get(loaded)}" for what, get in shape.items() if get(other) != get(loaded)]
    if differ:
        raise SinklessError(
            f"{flag} {path} is not {loaded.name} with registers: {', '.join(differ)} (--model's on the right); a row "
            "beside --model's would be another model's, scored with --model's layer and patch size",
            fix="pass a model of --model's architecture with registers, or run compare once per model",
        )
    other.name = path
    return other


def _registers(loaded, images, registers_model: str | None = None) -> AbstractContextManager:
    """Trained registers (Darcet et al. 2024): evaluate a model that has them (`--registers-model PATH`)."""
    if not registers_model:
        raise SinklessError(
            "--fix registers compares a model trained with registers: none given",
            fix="pass --registers-model PATH (a `sinkless distill` folder, or e.g. facebook/dinov2-with-registers-small)",
        )
    other = _with_registers(registers_model, "--registers-model", loaded)
    info = {"registers_model": registers_model, "architecture": type(other.model).__name__,
            "n_registers": other.adapter.n_registers(other.model)}
    return _Applied(_Swap(other), info)


def _distilled(loaded, images, distilled: str | None = None) -> AbstractContextManager:
    """Self-distilled registers, PH-Reg (Chen et al. 2025): a finished `sinkless distill` folder (`--distilled DIR`),
    or distilled here (cached) on bundled photos that are not among the evaluation images."""
    if distilled:
        other, source = _with_registers(distilled, "--distilled", loaded), distilled
    else:
        other, source = _distill_cached(loaded, images)
    info = {"distilled": source, "architecture": type(other.model).__name__, "n_registers": other.adapter.n_registers(other.model)}
    from sinkless.registers.distill import LOG_NAME, read_log

    record = None
    if other.source and (Path(other.source) / LOG_NAME).exists():
        record = read_log(Path(other.source), fix="restore the folder `sinkless distill` wrote, or distil again")
    if record is not None:
        info.update(teacher=record.get("model"), steps=record.get("steps_done"), training_images=record.get("data", {}).get("images"),
                    targets_from=(record.get("teacher") or {"kind": "original"}).get("kind"))  # original (PH-Reg) or ttr
    return _Applied(_Swap(other), info)


def _distill_cached(loaded, images):
    """``loaded`` distilled with ``PHOTO_SETTINGS`` on ``training_photos`` minus the evaluation images; cached by weights + data."""
    import hashlib

    from sinkless import zoo
    from sinkless.planted import fingerprint
    from sinkless.registers.distill import PHOTO_SETTINGS, distill, training_photos

    photos = training_photos(exclude=list(images))
    if not photos:
        raise SinklessError("every bundled training photo is among the evaluation images", fix="distill on other photos and pass --distilled DIR")
    settings = PHOTO_SETTINGS
    first = next(loaded.model.parameters())
    text = json.dumps({"weights": fingerprint(loaded.model), "photos": [n for n, _ in photos], "settings": settings.to_dict()}, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    name = "distilled-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in loaded.name)[-60:] + "-" + key[:8]
    log.info("distilling %s on %d bundled photos (not among the evaluation images); cached for later runs", loaded.name, len(photos))
    device = first.device
    # into a subfolder: the cache holds its build folder locked, and distill's own staged write locks its output folder
    entry = zoo.cached(name, key, lambda tmp: distill(loaded, photos, tmp / "model", settings, device=device, progress=True))
    folder = entry / "model"
    other = zoo.load(str(folder), dtype=first.dtype, device=first.device)
    other.name = f"{loaded.name}+distilled"
    return other, str(folder)


def _dvt(loaded, images, denoiser: str | list[str] | None = None, output: str | None = None) -> AbstractContextManager:
    """Denoising ViTs (Yang et al. 2024): the Stage-2 denoiser(s) of `sinkless denoise --train-denoiser` folders
    (each on the features it was trained on: the final output by default, or the last layer's keys), or
    without one Stage 1 on every image's final features (seconds per image: small sets), whose ``output`` is
    DVT's clean field (``clean``, the default) or the features minus the fitted position-tied map
    (``raw-minus-artifact``)."""
    from sinkless.denoise import Stage1Settings, apply_denoiser, load_denoiser
    from sinkless.denoise.hook import FeatureTransform, stage1_transform

    folders = [denoiser] if isinstance(denoiser, str) else list(denoiser or [])
    if folders and output is not None:
        raise SinklessError("the Stage-1 output choice applies to the per-image mode, not to a trained denoiser",
                            fix="drop --dvt-output, or drop --denoiser to run Stage 1 on every image")
    if folders:
        models = [load_denoiser(folder) for folder in folders]
        transforms = [apply_denoiser(loaded, model) for model in models]
        contexts = [transform() for transform in transforms]
        info = {"mode": "stage 2", "denoisers": [{"folder": str(f), "trained_for": m.config.model, "features": m.config.features,
                                                  "target": m.config.target}
                                                 for f, m in zip(folders, models)],
                "edits": [_edit(t) for t in transforms]}
        stack = contextlib.ExitStack()

        @contextlib.contextmanager
        def all_of():
            with stack:
                for context in contexts:
                    stack.enter_context(context)
                yield None

        return _Applied(all_of(), info)
    settings, output = Stage1Settings(), output or "clean"
    transform = stage1_transform(loaded, settings, output=output)  # checks the output's name
    applied = FeatureTransform(loaded, transform)
    info = {"mode": "stage 1 per image", "output": output, "stage1_settings": settings.to_dict(), "edits": [_edit(applied)]}
    return _Applied(applied(), info)


def _edit(transform) -> dict:
    """Which features a DVT ``FeatureTransform`` rewrites: ``output`` (the final norm's), or a layer's ``keys`` / ``residual``."""
    return {"features": transform.features, "layer": transform.layer}


def edits_reach(edits: Sequence[dict], kind: str, layer: int) -> bool:
    """Whether any of the DVT ``edits`` changes what a task reads: ``kind`` is ``output`` (the final norm's output),
    ``attention`` (a layer's attention weights), ``tokens`` (a block's output) or ``keys`` / ``queries`` /
    ``values`` of ``layer``. An edit changes its own site and everything computed after it."""
    if kind == "output":  # every edit reaches the final output
        return bool(edits)
    for edit in edits:
        features, at = edit["features"], edit["layer"]
        if features == "output":
            continue  # the final norm's output feeds nothing a layer reads
        if at < layer or (at == layer and (kind == features or kind == "tokens" or (features == "keys" and kind == "attention"))):
            return True
    return False


FIXES: dict[str, FixFactory] = {
    "none": _none,
    "ttr": _ttr,
    "registers": _registers,
    "distilled": _distilled,
    "dvt": _dvt,
}


def register_fix(name: str, factory: FixFactory) -> None:
    """Add or replace the fix ``name`` (e.g. when its implementation lands)."""
    FIXES[name] = factory


def fix_names() -> list[str]:
    return list(FIXES)


def make_fix(name: str, loaded, images: Sequence[Image.Image], **options) -> AbstractContextManager:
    """The context manager of fix ``name`` for ``loaded``; a clear error for unknown or unbuilt fixes.

    ``options`` go to the factory (e.g. ``registers="neurons.json"`` for ``ttr``).
    """
    factory = FIXES.get(name)
    if factory is None:
        raise SinklessError(f"unknown fix {name!r}", fix=f"choose from {', '.join(FIXES)}")
    return factory(loaded, images, **options)
