"""Any Hugging Face model by hub id or ``save_pretrained`` folder, or as an object the user holds.

The class loaded is the one the checkpoint was saved as (``config.architectures``), or a two-tower
model's vision tower (CLIP, SigLIP, SigLIP2); its structure is read on the meta device before any
weight is read (``sinkless.structure``), so an unsupported model fails at once, naming what is
missing. Preprocessing is the model's own: its tokenizer, or its image processor when this install
can build it (``AutoImageProcessor``, as transformers' pipelines load them); otherwise images are
resized and normalised by hand from its ``preprocessor_config.json`` or config. A model larger than
one GPU is spread over all of them with accelerate (``device_map="auto"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from sinkless import _hub
from sinkless._hub import WEIGHT_FILES
from sinkless.adapters import Adapter, Modality, adapter_for
from sinkless.errors import SinklessError
from sinkless.images import IMAGENET_MEAN, IMAGENET_STD, ImageSpec
from sinkless.structure import backbone
from sinkless.zoo import ZOO, Loaded, _quiet_transformers

__all__ = ["load_pretrained", "as_loaded", "model_class", "WEIGHT_FILES"]

log = logging.getLogger(__name__)

def _image_spec_from(source: str | None, config, adapter: Adapter, processor=None) -> ImageSpec:
    """Size and normalisation from the image processor (or its preprocessor_config.json), else the model config."""
    vision = getattr(config, "vision_config", config)
    size = int(getattr(vision, "image_size", 224) or 224)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre: dict = {}
    if processor is not None:
        pre = {k: getattr(processor, k, None) for k in ("image_mean", "image_std", "crop_size", "size")}
    elif source:
        with contextlib.suppress(Exception):
            from transformers.utils import cached_file

            path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
            if path:
                pre = json.loads(Path(path).read_text())
    mean = tuple(pre.get("image_mean") or mean)
    std = tuple(pre.get("image_std") or std)
    crop = pre.get("crop_size") or pre.get("size") or {}
    if isinstance(crop, int):
        size = crop
    elif crop:
        crop = dict(crop) if not isinstance(crop, dict) else crop
        size = int(crop.get("height") or crop.get("shortest_edge") or size)
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else int(vision.patch_size)
    return ImageSpec(size=size, mean=mean, std=std, patch_size=patch)


def model_class(config):
    """The HF class sinkless loads for ``config``: a two-tower model's vision tower (CLIP, SigLIP, SigLIP2),
    else the class the checkpoint was saved as (``architectures``), else ``AutoModel``."""
    import transformers
    from transformers.models.auto import modeling_auto

    vision, text = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    if vision is not None and text is not None:
        name = modeling_auto.MODEL_MAPPING_NAMES.get(getattr(vision, "model_type", ""))
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    for arch in getattr(config, "architectures", None) or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    if config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _empty_model(cls, config) -> nn.Module:
    """``cls`` built on the meta device: its structure (and size) without memory or weights."""
    from accelerate import init_empty_weights

    own = getattr(cls, "config_class", None)
    if own is not None and not isinstance(config, own) and getattr(config, "vision_config", None) is not None:
        config = config.vision_config  # a two-tower checkpoint loaded as its vision tower
    with init_empty_weights(), _quiet_transformers():
        if hasattr(cls, "from_config"):
            return cls.from_config(config)
        return cls._from_config(config)


def _read_config(name: str, source: str, local: bool, offline: bool = False):
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as error:
        if local:
            raise SinklessError(
                f"{Path(source) / 'config.json'} cannot be read as a Hugging Face config ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
                fix="re-save the model with model.save_pretrained(folder), or fix the JSON",
            ) from None
        raise _hub.unknown_model(name, ZOO, error, offline) from None


def _load_processor(source: str, modality: Modality, *, required: bool):
    """The model's own tokenizer (text) or image processor (vision), as transformers' pipelines load them."""
    import transformers

    with _quiet_transformers():
        if modality is Modality.TEXT:
            try:
                return transformers.AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError, KeyError, TypeError) as error:
                if not required:
                    return None
                raise SinklessError(
                    f"{source} has no usable tokenizer ({type(error).__name__}: {str(error).splitlines()[0][:160]})",
                    fix="save it beside the weights with tokenizer.save_pretrained(folder)",
                ) from None
        try:
            return transformers.AutoImageProcessor.from_pretrained(source)
        except Exception as error:  # noqa: BLE001 - no processor, or one this install cannot build (e.g. torchvision-only)
            log.info("no image processor for %s (%s): resizing and normalising by hand", source, type(error).__name__)
            return None


def _fits_one_device(model: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    size = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return size < 0.85 * torch.cuda.get_device_properties(index).total_memory


def load_pretrained(name: str, dtype: torch.dtype, device: torch.device | None = None, device_map=None) -> Loaded:
    """A hub id or local folder as a ``Loaded`` (see the module docstring); clear errors for bad folders."""
    local = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise SinklessError(
            f"{name!r} is not a zoo name and {local} is not a model folder (no config.json)",
            fix=f"use a zoo name ({', '.join(ZOO)}), a Hugging Face hub id, or a folder written by save_pretrained",
        )
    offline = False
    if looks_local:
        _hub.check_model_folder(local, name)  # config.json parses and names a type, weights are there
    else:
        offline = _hub.go_offline_if_unreachable()  # probed once (<= 2 s), instead of half a minute of retries
    source = str(local) if looks_local else name
    config = _read_config(name, source, looks_local, offline)
    if looks_local and getattr(config, "sinkless_attention", None):  # a `train-attn` model: its attention variant, not softmax
        from sinkless.attention.convert import load as load_converted

        loaded = load_converted(local, dtype=dtype, device=device if device is not None else "cpu")
        loaded.name = name
        return loaded
    cls = model_class(config)
    empty = _empty_model(cls, config)
    adapter = adapter_for(backbone(empty))  # unsupported structure fails here, before any weight is read
    if looks_local and adapter.modality is Modality.TEXT:
        _hub.check_tokenizer_files(local)
    if device_map is None and device is not None and not _fits_one_device(empty, dtype, device):
        device_map = "auto"  # larger than one GPU: accelerate spreads the layers over the GPUs (then the CPU)
        log.info("%s does not fit on one GPU: loading with device_map='auto' (%d GPUs)", name, torch.cuda.device_count())
    processor = _load_processor(source, adapter.modality, required=adapter.modality is Modality.TEXT)
    with _quiet_transformers(), _hub.folder_errors(local if looks_local else None):
        try:
            model = cls.from_pretrained(source, dtype=dtype, device_map=device_map).eval()
        except (OSError, ValueError, RuntimeError) as error:
            raise SinklessError(
                f"cannot load the weights of {name} ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
                fix="check that the folder was written by save_pretrained and is complete",
            ) from None
    from sinkless.registers.add import restore_registers  # ViT/CLIP/SigLIP registers saved by sinkless (docs/REGISTERS.md)

    restore_registers(model, source)
    run = backbone(model)
    adapter = adapter_for(run)
    tokenizer = processor if adapter.modality is Modality.TEXT else None
    image_processor = processor if adapter.modality is Modality.VISION else None
    spec = _image_spec_from(source, config, adapter, image_processor) if adapter.modality is Modality.VISION else None
    info = {"class": type(model).__name__, "device_map": device_map} if device_map else {"class": type(model).__name__}
    return Loaded(name, run, adapter, spec, tokenizer, source=source, info=info, processor=image_processor)


def as_loaded(model, processor=None, *, name: str | None = None) -> Loaded:
    """Wrap a model object the user already holds (any supported HF model, or a ``Loaded``) for sinkless.

    ``processor``: its tokenizer, image processor or ``AutoProcessor``; when None, the one saved in
    the model's own folder (``config._name_or_path``) if there is one; False: none is needed (the
    model is only edited, never fed by sinkless). Nothing is copied or changed:
    the returned ``Loaded`` drives the very same module (for CLIP/SigLIP two-tower models, its vision tower).
    """
    if isinstance(model, Loaded):
        return model if processor is None or processor is False else _with_processor(model, processor)
    if not isinstance(model, nn.Module):
        raise SinklessError(f"expected a torch model, got {type(model).__name__}", fix="pass a Hugging Face model object or a zoo name")
    run = backbone(model)
    adapter = adapter_for(run)
    config = getattr(model, "config", None)
    origin = getattr(config, "_name_or_path", "") or ""
    label = name or origin or type(model).__name__
    loaded = Loaded(label, run, adapter, source=origin, info={"class": type(model).__name__, "object": True})
    if processor is False:
        return loaded
    if processor is None and origin and Path(origin).is_dir():
        processor = _load_processor(origin, adapter.modality, required=False)
    if processor is not None:
        return _with_processor(loaded, processor)
    if adapter.modality is Modality.TEXT:
        raise SinklessError(
            f"{label} is a language model and no tokenizer came with it",
            fix="pass processor=AutoTokenizer.from_pretrained(...) (the model's own tokenizer)",
        )
    loaded.image_spec = _image_spec_from(None, config, adapter)
    return loaded


def _with_processor(loaded: Loaded, processor) -> Loaded:
    """``loaded`` using ``processor``: the matching half of an ``AutoProcessor``, a tokenizer or an image processor."""
    from dataclasses import replace

    if loaded.modality is Modality.TEXT:
        tokenizer = getattr(processor, "tokenizer", None) or processor
        if not callable(getattr(tokenizer, "decode", None)):
            raise SinklessError(f"{type(processor).__name__} is not a tokenizer", fix="pass the model's tokenizer as processor=")
        return replace(loaded, tokenizer=tokenizer)
    image_processor = getattr(processor, "image_processor", None) or processor
    if callable(getattr(image_processor, "decode", None)):
        raise SinklessError(f"{type(processor).__name__} is a tokenizer, but {loaded.name} is a vision model", fix="pass its image processor")
    config = getattr(loaded.model, "config", None)
    return replace(loaded, processor=image_processor, image_spec=_image_spec_from(None, config, loaded.adapter, image_processor))
