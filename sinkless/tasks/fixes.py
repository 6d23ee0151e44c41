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
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from PIL import Image

from sinkless.errors import SinklessError

__all__ = ["FixFactory", "FIXES", "register_fix", "fix_names", "make_fix"]

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


def _dvt(loaded, images, denoiser: str | list[str] | None = None) -> AbstractContextManager:
    """Denoising ViTs (Yang et al. 2024): the Stage-2 denoiser(s) of `sinkless denoise --train-denoiser` folders
    (each on the features it was trained on: the final output by default, or the last layer's keys), or
    without one Stage 1 on every image's final features (seconds per image: small sets)."""
    from sinkless.denoise import Stage1Settings, apply_denoiser, load_denoiser
    from sinkless.denoise.hook import FeatureTransform, stage1_transform

    folders = [denoiser] if isinstance(denoiser, str) else list(denoiser or [])
    if folders:
        models = [load_denoiser(folder) for folder in folders]
        contexts = [apply_denoiser(loaded, model)() for model in models]
        info = {"mode": "stage 2", "denoisers": [{"folder": str(f), "trained_for": m.config.model, "features": m.config.features}
                                                 for f, m in zip(folders, models)]}
        stack = contextlib.ExitStack()

        @contextlib.contextmanager
        def all_of():
            with stack:
                for context in contexts:
                    stack.enter_context(context)
                yield None

        return _Applied(all_of(), info)
    settings = Stage1Settings()
    info = {"mode": "stage 1 per image", "stage1_settings": settings.to_dict()}
    return _Applied(FeatureTransform(loaded, stage1_transform(loaded, settings))(), info)


def _not_built(what: str, fix: str) -> FixFactory:
    def factory(loaded, images) -> AbstractContextManager:
        raise SinklessError(what, fix=fix)

    factory.__doc__ = what
    factory.not_built = True  # type: ignore[attr-defined]
    return factory


FIXES: dict[str, FixFactory] = {
    "none": _none,
    "ttr": _ttr,
    "registers": _not_built(
        "trained registers (`registers`) need a model trained with registers: not built yet",
        "compare a model that ships registers (e.g. facebook/dinov2-with-registers-small) with --fix none",
    ),
    "distilled": _not_built(
        "self-distilled registers, PH-Reg (`distilled`), are not built yet",
        "compare the other fixes for now (see `sinkless compare --help`)",
    ),
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
