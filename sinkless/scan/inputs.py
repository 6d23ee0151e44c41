"""What a scan looks at: image or text inputs, from files, globs, folders, inline text or the bundled samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image

from sinkless._io import read_utf8
from sinkless.adapters import Modality
from sinkless.errors import SinklessError
from sinkless.images import IMAGE_SUFFIXES, expand_paths, load_image, sample_images

__all__ = ["ImageInput", "TextInput", "resolve_inputs", "sample_text", "TEXT_SUFFIXES", "DEFAULT_SAMPLES"]

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
