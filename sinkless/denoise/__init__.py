"""Denoising Vision Transformers (DVT, Yang et al. 2024) in pure PyTorch.

Stage 1 (``denoise_image``): one image's features split into a clean field, the model's
position-tied artifact and a residual, from many crops. Stage 2 (``train_denoiser``, ``Denoiser``):
one transformer block, trained on Stage-1 outputs, that denoises any image in one pass; applied to a
model as a hook (``FeatureTransform``). ``sinkless denoise`` and ``compare --fix dvt`` use these.
"""

from sinkless.denoise.field import FIELDS, FourierField, HashGridField, make_field
from sinkless.denoise.hook import FeatureTransform, denoiser_transform, stage1_transform
from sinkless.denoise.stage1 import Decomposition, Stage1Result, Stage1Settings, denoise_image, fit
from sinkless.denoise.stage2 import Denoiser, DenoiserConfig, load_denoiser, save_denoiser
from sinkless.denoise.train import DenoiserSettings, train_denoiser
from sinkless.denoise.views import FEATURES, Views, feature_reader, make_views

__all__ = [
    "Stage1Settings", "Stage1Result", "Decomposition", "denoise_image", "fit",
    "Denoiser", "DenoiserConfig", "DenoiserSettings", "train_denoiser", "load_denoiser", "save_denoiser",
    "FeatureTransform", "denoiser_transform", "stage1_transform", "apply_denoiser",
    "HashGridField", "FourierField", "FIELDS", "make_field", "FEATURES", "Views", "feature_reader", "make_views",
]


def apply_denoiser(loaded, denoiser) -> FeatureTransform:
    """The Stage-2 ``denoiser`` (a ``Denoiser`` or its folder) on ``loaded`` (a ``Loaded``, model object or name):
    ``with apply_denoiser(m, d)(): ...``
    or ``handle = apply_denoiser(m, d).attach(); ...; handle.remove()``."""
    from sinkless.devices import model_device
    from sinkless.zoo import loaded_from

    loaded = loaded_from(loaded)
    if not isinstance(denoiser, Denoiser):
        denoiser = load_denoiser(denoiser)
    denoiser = denoiser.to(model_device(loaded.model))  # where the features are (CPU or CUDA)
    _check_compatible(loaded, denoiser)
    return FeatureTransform(loaded, denoiser_transform(denoiser), features=denoiser.config.features, layer=denoiser.config.layer)


def _check_compatible(loaded, denoiser) -> None:
    from sinkless.errors import SinklessError

    if denoiser.config.model and denoiser.config.model != loaded.name:
        import logging

        logging.getLogger(__name__).warning("this denoiser was trained for %s, applied to %s: its features must be that model's",
                                            denoiser.config.model, loaded.name)
    width = loaded.model.config.hidden_size if denoiser.config.features != "keys" else None
    if width is not None and width != denoiser.config.dim:
        raise SinklessError(
            f"the denoiser reads {denoiser.config.dim}-wide features, {loaded.name} has {width}",
            fix=f"use a denoiser trained for this model (this one was trained for {denoiser.config.model or 'another model'})",
        )
