"""What a scan looks at: image or text inputs, from files, globs, folders, inline text or the bundled
samples, and how they become model inputs.

Preprocessing goes through the model's own Hugging Face processor when it has one, the way
transformers' pipelines call it (``image_processor(images, return_tensors="pt")``, the tokenizer
with truncation); an ``image_size`` overrides the processor's size (and crop) so any size can be
scanned, and models that interpolate their position embeddings are told to
(``interpolate_pos_encoding``). Models without a processor are resized to a square and normalised by hand.

Shapes: B inputs, N tokens.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from PIL import Image

from sinkless._io import read_utf8
from sinkless.adapters import Modality
from sinkless.errors import SinklessError
from sinkless.images import IMAGE_SUFFIXES, expand_paths, load_image, sample_images, to_pixels

__all__ = ["ImageInput", "TextInput", "Batch", "prepare_batch", "resolve_inputs", "sample_text", "TEXT_SUFFIXES", "DEFAULT_SAMPLES"]

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
DEFAULT_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "camera")


@dataclass
class ImageInput:
    name: str
    image: Image.Image


@dataclass
class TextInput:
    name: str
    text: str


def sample_text() -> str:
    """A bundled English paragraph (public domain) for text scans."""
    return (resources.files("sinkless") / "data" / "sample.txt").read_text(encoding="utf-8").strip()


def resolve_inputs(
    inputs: Sequence[str], texts: Sequence[str], modality: Modality
) -> list[ImageInput] | list[TextInput]:
    """Turn CLI inputs into scan inputs for a model of ``modality``; bundled samples when none are given."""
    if modality is Modality.VISION:
        if texts:
            raise SinklessError("--text was given but the model is a vision model", fix="pass image files, or use a language model")
        if not inputs:
            return [ImageInput(name, image) for name, image in sample_images(DEFAULT_SAMPLES)]
        paths = expand_paths(inputs, IMAGE_SUFFIXES)
        for path in paths:
            if path.suffix.lower() in TEXT_SUFFIXES:
                raise SinklessError(f"{path} is a text file but the model is a vision model", fix="pass images (png, jpg, ...) or choose a language model")
        return [ImageInput(str(path), load_image(path)) for path in paths]

    result = [TextInput(f"text{i + 1}" if len(texts) > 1 else "text", t) for i, t in enumerate(texts) if t.strip()]
    if texts and not result:
        raise SinklessError("--text is empty", fix="give some text after --text")
    if inputs:
        for path in expand_paths(inputs, TEXT_SUFFIXES):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                raise SinklessError(f"{path} is an image but the model is a language model", fix="pass text files or --text, or choose a vision model")
            result.append(TextInput(str(path), read_utf8(path)))
    if not result:
        result = [TextInput("sample.txt", sample_text())]
    return result


# -- model inputs ----------------------------------------------------------------------------------
@dataclass
class Batch:
    """Model keyword inputs for a batch and how its sequences map back to the inputs."""

    kwargs: dict  # model keyword arguments (CPU tensors)
    lengths: list  # text: real tokens of each input (right padding after them); vision: None each
    image_hw: tuple[int, int] | list[tuple[int, int]] | None  # vision: the batch's pixel size (a list when inputs differ)
    grids: list[tuple[int, int]] | None = None  # vision: each input's patch grid
    tokens: list[list[str]] | None = None  # text: decoded tokens


@functools.lru_cache(maxsize=64)
def _forward_accepts(model_class: type, name: str) -> bool:
    return name in inspect.signature(model_class.forward).parameters


def _size_overrides(processor, size: int, patch: int) -> dict:
    """Processor call options that make it return ``size`` x ``size`` pixels (or that many patches)."""
    if hasattr(processor, "max_num_patches"):  # SigLIP2 (NaFlex): a patch budget instead of a size
        return {"max_num_patches": (size // patch) ** 2}
    options = {"size": {"height": size, "width": size}}
    if getattr(processor, "do_center_crop", False):
        options = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return options


def _image_batch(loaded, items: Sequence[ImageInput], image_size: int | None) -> Batch:
    spec, processor, model = loaded.image_spec, loaded.processor, loaded.model
    patch = spec.patch_size if spec is not None else loaded.adapter.patch_size(model)
    size = image_size // patch * patch if image_size else None
    if size is not None and size < patch:
        raise SinklessError(f"image size {image_size} is smaller than one {patch}-pixel patch", fix=f"use --image-size >= {patch}")
    images = [item.image.convert("RGB") for item in items]
    if processor is not None:
        options = _size_overrides(processor, size, patch) if size else {}
        out = processor(images=images, return_tensors="pt", **options)
        kwargs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        if "spatial_shapes" in kwargs:  # patchified input: each image keeps its aspect ratio, padding after
            grids = [tuple(int(v) for v in shape) for shape in kwargs["spatial_shapes"].tolist()]
            hw = [(h * patch, w * patch) for h, w in grids]
            return Batch(kwargs, [None] * len(items), hw if len(set(hw)) > 1 else hw[0], grids)
        image_hw = tuple(kwargs["pixel_values"].shape[-2:])
    else:
        side = size or spec.size // patch * patch
        kwargs = {"pixel_values": to_pixels(images, spec, side)}
        image_hw = (side, side)
    native = getattr(getattr(model, "config", None), "image_size", None)
    if _forward_accepts(type(model), "interpolate_pos_encoding") and native and tuple(image_hw) != (native, native):
        kwargs["interpolate_pos_encoding"] = True  # other sizes than the trained one
    grid = (image_hw[0] // patch, image_hw[1] // patch)
    return Batch(kwargs, [None] * len(items), image_hw, [grid] * len(items))


def _text_batch(loaded, items: Sequence[TextInput], max_tokens: int) -> Batch:
    tok = loaded.tokenizer
    encoded = [tok(item.text, truncation=True, max_length=max_tokens)["input_ids"] for item in items]
    lengths = [len(ids) for ids in encoded]
    empty = [item.name for item, n in zip(items, lengths) if n == 0]
    if empty:
        raise SinklessError(f"text {empty[0]!r} gives no tokens with this model's tokenizer",
                            fix="check that the tokenizer belongs to the model (its vocabulary must cover the text)")
    width = max(lengths)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, seq in enumerate(encoded):  # right padding: real tokens never attend to pads in a causal LM
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    tokens = [[tok.decode([t]) for t in seq] for seq in encoded]
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if _forward_accepts(type(loaded.model), "use_cache"):
        kwargs["use_cache"] = False  # a scan needs no KV cache (at 32k tokens it would be gigabytes)
    return Batch(kwargs, lengths, None, None, tokens)


def prepare_batch(loaded, items: Sequence[ImageInput] | Sequence[TextInput], *, image_size: int | None = None, max_tokens: int = 512) -> Batch:
    """Model inputs for ``items`` through the model's own processor (see the module docstring)."""
    if loaded.modality is Modality.VISION:
        return _image_batch(loaded, items, image_size)
    return _text_batch(loaded, items, max_tokens)
