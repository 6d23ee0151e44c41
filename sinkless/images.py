"""Reading images, the bundled sample photographs, and turning images into model inputs."""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sinkless._io import MANIFEST, TMP_MARK
from sinkless.errors import SinklessError

log = logging.getLogger(__name__)

__all__ = [
    "ImageSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "load_image",
    "expand_paths",
    "sample_images",
    "SAMPLE_NAMES",
    "to_pixels",
    "natural_crops",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Natural photographs shipped inside the scikit-image wheel (no download): public domain / CC0.
SAMPLE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "motorcycle_left", "clock", "page", "moon", "brick", "grass", "gravel")


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: square side, normalisation and patch size."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 14


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, with a clear error for a missing or unreadable file.

    Read correctly, not just converted: 16-bit and 32-bit integer images are scaled from their own
    range (65535), float images from [0, 1] (or [0, 255]; other ranges are stretched), palette and
    alpha images are composited on white (transparent pixels carry no colour of their own), CMYK and
    Lab go through colour management, and the EXIF orientation of camera photos is applied. Animated
    or multi-page files give their first frame.
    """
    path = Path(path)
    if not path.exists():
        raise SinklessError(f"image file not found: {path}", fix="check the path")
    if path.is_dir():
        raise SinklessError(f"{path} is a folder, not an image", fix="pass the folder itself as an INPUT (its images are read), or an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image, path)
    except SinklessError:
        raise
    except Image.DecompressionBombError as error:
        raise SinklessError(f"{path} is too large to read safely ({error})", fix="downscale the image (a ViT sees it at a few hundred pixels anyway)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise SinklessError(
            f"cannot read {path} as an image ({type(error).__name__}: {error})",
            fix=f"pass image files ({', '.join(IMAGE_SUFFIXES)}); is the file truncated or not an image?",
        ) from None


_HIGH_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_rgb(image: Image.Image, path: Path | str = "image") -> Image.Image:
    """Any PIL image as an 8-bit RGB image (see ``load_image``)."""
    from PIL import ImageOps

    with contextlib.suppress(Exception):  # a broken EXIF block must not make the pixels unreadable
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _HIGH_BIT:
        image = Image.fromarray(_to_uint8(np.asarray(image), mode, path))
        mode = image.mode
    if mode in ("P", "PA") and ("transparency" in image.info or mode == "PA"):
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("CMYK", "LAB"):
        converted = _colour_managed(image)
        if converted is not None:
            return converted
    return image.convert("RGB")


def _to_uint8(array: np.ndarray, mode: str, path: Path | str) -> np.ndarray:
    """High bit-depth grey levels (H, W) -> uint8: integers by their type's range, floats by [0, 1]."""
    values = array.astype(np.float64)
    if values.size and not np.isfinite(values).all():
        raise SinklessError(f"{path} holds NaN or infinite pixel values", fix="save the image without invalid pixels (e.g. as 8-bit PNG)")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled = values / 65535.0
    elif mode == "I" and low >= 0 and high <= 65535:
        scaled = values / (65535.0 if high > 255 else 255.0)
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values
    elif mode == "F" and low >= 0 and high <= 255:
        scaled = values / 255.0
    else:  # signed or unusual ranges: stretch what is there
        log.info("%s: pixel values %g..%g outside a standard range; stretched to 0..255", path, low, high)
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _colour_managed(image: Image.Image) -> Image.Image | None:
    """CMYK with an embedded ICC profile, or Lab -> sRGB through LittleCMS; None: use PIL's plain conversion."""
    try:
        from PIL import ImageCms
    except ImportError:  # pragma: no cover
        return None
    try:
        srgb = ImageCms.createProfile("sRGB")
        if image.mode == "LAB":
            source = ImageCms.createProfile("LAB")
        elif image.info.get("icc_profile"):
            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        else:
            return None
        return ImageCms.applyTransform(image, ImageCms.buildTransform(source, srgb, image.mode, "RGB"))
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def _written_by_sinkless(path: Path, cache: dict[Path, set[Path]]) -> bool:
    """Is ``path`` an output sinkless wrote (a report figure, ...) into a folder above it?"""
    from sinkless._io import sinkless_outputs

    resolved = path.resolve()
    for folder in resolved.parents:
        if folder not in cache:
            cache[folder] = sinkless_outputs(folder) if (folder / MANIFEST).exists() else set()
        if resolved in cache[folder]:
            return True
    return False


def _own_files(paths: list[Path], cache: dict[Path, set[Path]]) -> list[Path]:
    """``paths`` without sinkless's own outputs and temporary files (a report written inside an input folder)."""
    kept = [p for p in paths if TMP_MARK not in str(p) and not _written_by_sinkless(p, cache)]
    if len(kept) < len(paths):
        log.info("skipped %d file(s) sinkless wrote itself (reports, figures)", len(paths) - len(kept))
    return kept


def expand_paths(inputs: Iterable[str], suffixes: Sequence[str] | None = None) -> list[Path]:
    """Files named by ``inputs``: files, directories (their files with ``suffixes``, sorted) or globs.

    Folders and globs leave out hidden files and what sinkless itself wrote there (report figures,
    listed in the folder's ``.sinkless-outputs.json``), so an ``--out`` inside an input folder is not
    read back as input. Raises a ``SinklessError`` naming the first input that matches nothing.
    """
    found: list[Path] = []
    cache: dict[Path, set[Path]] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = _folder_files(path, suffixes, cache)
            if not files:
                raise SinklessError(f"directory {path} holds no input files", fix=f"expected files ending in {', '.join(suffixes or ['*'])}")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            # a pattern stands for what the shell would have passed: its files, and the input files of its folders
            matches: list[Path] = []
            for match in sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True)):
                matches.extend([match] if match.is_file() else _folder_files(match, suffixes, cache) if match.is_dir() else [])
            matches = _own_files(matches, cache)
            if not matches:
                raise SinklessError(f"no file matches {item!r}", fix="check the pattern (quote it so the shell does not expand it)")
            found.extend(matches)
        elif path.exists():
            raise SinklessError(f"input {item} is not a regular file or folder", fix="pass image/text files, folders or glob patterns")
        else:
            raise SinklessError(f"input not found: {item}", fix="pass existing files, directories or glob patterns")
    once: dict[str, Path] = {}
    for path in found:  # a file named twice (a folder and a file in it, two spellings) is read once
        once.setdefault(os.path.realpath(path), path)
    if len(once) < len(found):
        log.info("%d input file(s) were named more than once: each is read once", len(found) - len(once))
    return list(once.values())


def unique_names(names: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    """One name per item, for output files: a repeated name gets _2, _3, ... skipping every name given or already
    used (``x``, ``x``, ``x_2`` -> ``x``, ``x_3``, ``x_2``) and the ``reserved`` ones (an output's own files)."""
    given, taken, out = set(names), set(reserved), []
    for name in names:
        candidate, k = name, 1
        while candidate in taken or (candidate != name and candidate in given):
            k += 1
            candidate = f"{name}_{k}"
        taken.add(candidate)
        out.append(candidate)
    return out


def _folder_files(path: Path, suffixes: Sequence[str] | None, cache: dict[Path, set[Path]]) -> list[Path]:
    """The input files of the folder ``path`` (not its subfolders), sorted, without hidden files or sinkless's own outputs."""
    try:
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and (suffixes is None or p.suffix.lower() in suffixes)
        )
    except OSError as error:
        raise SinklessError(f"cannot list folder {path} ({error.strerror or error})", fix="check its permissions") from None
    return _own_files(files, cache)


def _skimage(name: str) -> np.ndarray:
    from skimage import data

    array = getattr(data, name)() if name != "motorcycle_left" else data.stereo_motorcycle()[0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def sample_images(names: Sequence[str] | None = None) -> list[tuple[str, Image.Image]]:
    """Natural photographs bundled with scikit-image, as ``(name, RGB image)`` pairs."""
    chosen = SAMPLE_NAMES if names is None else names
    unknown = sorted(set(chosen) - set(SAMPLE_NAMES))
    if unknown:
        raise ValueError(f"unknown sample images {unknown}; choose from {list(SAMPLE_NAMES)}")
    return [(name, Image.fromarray(_skimage(name))) for name in chosen]


def to_pixels(images: Sequence[Image.Image], spec: ImageSpec, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Resize (bicubic, whole image, no crop) and normalise images into a (B, 3, H, W) float tensor."""
    height, width = (size, size) if isinstance(size, int) else size or (spec.size, spec.size)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arrays = []
    for image in images:
        resized = (image if image.mode == "RGB" else _to_rgb(image)).resize((width, height), Image.BICUBIC)
        arrays.append((np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())  # (B, 3, H, W)


def natural_crops(n: int, *, seed: int = 0, names: Sequence[str] | None = None, min_scale: float = 0.35) -> list[Image.Image]:
    """``n`` varied natural images: random square-ish crops (and flips) of the sample photographs.

    Deterministic for ``seed``. Used wherever a method needs many natural images offline
    (register-neuron discovery, planted-model calibration, benchmarks).
    """
    rng = np.random.default_rng(seed)
    photos = [image for _, image in sample_images(names)]
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        width, height = photo.size
        scale = rng.uniform(min_scale, 1.0)
        side = int(min(width, height) * scale)
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(crop)
    return crops
