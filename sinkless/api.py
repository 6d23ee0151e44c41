"""The public face on objects: scan a model you already hold, find its register neurons, load by name.

``sinkless.scan(model, inputs)`` and ``sinkless.find_register_neurons(model, inputs)`` take any
supported Hugging Face model object (or what ``sinkless.load`` returns), images or texts in the
forms a user has them (PIL images, paths, strings), and the model's own processor when it did
not come from a folder that holds one. The model is never changed outside the call: it runs in
evaluation mode and with the attention implementation the measurement needs only while the call
lasts, and every hook is removed on the way out, exception or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from sinkless import distributed, zoo
from sinkless.adapters import Modality
from sinkless.errors import SinklessError
from sinkless.pretrained import as_loaded
from sinkless.scan.inputs import TEXT_SUFFIXES, ImageInput, TextInput, resolve_inputs
from sinkless.scan.measure import ScanSettings, parse_layers
from sinkless.scan.norms import OutlierRule, Rule

__all__ = ["load", "scan", "find_register_neurons", "as_inputs", "scan_settings", "evaluating"]


def load(name: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", device_map=None) -> zoo.Loaded:
    """A zoo name (``sinkless models``), Hugging Face hub id or ``save_pretrained`` folder, ready for sinkless.

    ``.model`` is the plain transformers model, ``.tokenizer`` / ``.processor`` its preprocessing.
    """
    return zoo.load(name, device=device, dtype=dtype, device_map=device_map)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Evaluation mode (no dropout) and no gradients while inside; each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def as_inputs(inputs, modality: Modality) -> list[ImageInput] | list[TextInput]:
    """Scan inputs from what a user holds: PIL images, image/text paths, folders, globs, strings of text,
    or ``ImageInput`` / ``TextInput``; one item or a sequence."""
    if isinstance(inputs, (str, Path, Image.Image, ImageInput, TextInput)) or not isinstance(inputs, Sequence):
        inputs = [inputs]
    if not inputs:
        raise SinklessError("no inputs given", fix="pass images (PIL or paths) for a vision model, texts for a language model")
    items: list = []
    for k, item in enumerate(inputs):
        if isinstance(item, (ImageInput, TextInput)):
            items.append(item)
        elif isinstance(item, Image.Image):
            if modality is not Modality.VISION:
                raise SinklessError("an image was given to a language model", fix="pass texts")
            items.append(ImageInput(getattr(item, "filename", "") or f"image{k}", item))
        elif isinstance(item, Path) or (isinstance(item, str) and modality is Modality.VISION):
            items.extend(resolve_inputs([str(item)], [], modality))
        elif isinstance(item, str):  # text: a text file when it names one, else the text itself
            if item.lower().endswith(TEXT_SUFFIXES) and Path(item).is_file():
                items.extend(resolve_inputs([item], [], modality))
            else:
                if not item.strip():
                    raise SinklessError(f"text {k} is empty", fix="pass some text (or the path of a text file)")
                items.append(TextInput(f"text{k}" if len(inputs) > 1 else "text", item))
        else:
            raise SinklessError(f"cannot scan a {type(item).__name__}", fix="pass PIL images, paths or strings")
    kinds = {type(item) for item in items}
    wanted = ImageInput if modality is Modality.VISION else TextInput
    if kinds != {wanted}:
        raise SinklessError(f"these inputs do not suit a {modality.value} model", fix="pass images to vision models and texts to language models")
    return items


def scan_settings(n_layers: int, **settings) -> ScanSettings:
    """``ScanSettings`` from keyword settings: its fields, plus ``threshold=X`` (absolute outlier threshold),
    ``rule="robust"|"meanstd"`` and ``layers`` as "0-5,11" or a list of ints."""
    names = {f.name for f in dataclasses.fields(ScanSettings)}
    unknown = sorted(set(settings) - names - {"threshold"})
    if unknown:
        raise SinklessError(f"unknown scan settings {unknown}", fix=f"valid settings: {', '.join(sorted(names | {'threshold'}))}")
    rule = settings.pop("rule", OutlierRule())
    threshold = settings.pop("threshold", None)
    if isinstance(rule, str) and rule not in {r.value for r in Rule}:
        raise SinklessError(f"unknown outlier rule {rule!r}", fix=f"choose from {', '.join(r.value for r in Rule)}")
    if isinstance(rule, (str, Rule)):
        rule = OutlierRule(rule=Rule(rule))
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (math.isfinite(threshold) and threshold > 0):
            raise SinklessError(f"threshold must be a positive number (a norm ratio to the layer's median), got {threshold!r}",
                                fix="e.g. threshold=3, or leave it out for the robust rule")
        rule = dataclasses.replace(rule, absolute=float(threshold))
    layers = settings.pop("layers", None)
    if isinstance(layers, str) or layers is None:
        layers = parse_layers(layers, n_layers)
    else:
        layers = list(layers) if isinstance(layers, (list, tuple, set, range)) else [layers]
        bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, numbers.Integral) or not -n_layers <= l < n_layers]
        if bad or not layers:
            raise SinklessError(f"layers {layers!r} {'name layers outside ' + f'0..{n_layers - 1}' if bad else 'is empty'}",
                                fix=f"pass layer numbers from 0 to {n_layers - 1} (-1: the last), or leave layers out for all")
        layers = tuple(sorted({int(l) % n_layers for l in layers}))
    for name, least in (("batch_size", 1), ("max_tokens", 1), ("warmup", 0), ("massive_per_layer", 0)):
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least):
            raise SinklessError(f"{name} must be a whole number >= {least}, got {value!r}")
    size = settings.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
        raise SinklessError(f"image_size must be a whole number of pixels >= 1, got {size!r}", fix="or leave it out for the model's own")
    return ScanSettings(rule=rule, layers=layers, **settings)


def scan(model, inputs, processor=None, *, out: str | Path | None = None, progress: bool = False, **settings):
    """Scan ``model`` (an HF model object, a ``Loaded`` or a zoo/hub/folder name) on ``inputs``: a ``Report``.

    ``processor``: the model's tokenizer / image processor / ``AutoProcessor`` (default: the one saved
    with the model, else the hand-made resize for vision models). ``settings``: ``ScanSettings`` fields
    (``layers``, ``batch_size``, ``image_size``, ``max_tokens``, ``attention``, ``rope_scale``, ...),
    ``threshold`` and ``rule``. ``out``: also write report.json, report.html and the figures there.
    """
    from sinkless.scan import scan as run_scan
    from sinkless.scan import write_reports

    loaded = zoo.load(model) if isinstance(model, str) else as_loaded(model, processor)
    items = as_inputs(inputs, loaded.modality)
    chosen = scan_settings(loaded.num_layers, **settings)
    with evaluating(loaded.model):
        report, records = run_scan(loaded, items, chosen, progress=progress)
    if out is not None and distributed.is_main():  # under a launcher every process holds the report; one writes it
        write_reports(out, [(report, records, items)])
    return report


def find_register_neurons(model, inputs, processor=None, *, heldout=None, progress: bool = False, **settings):
    """Register neurons of ``model`` found on ``inputs`` (Jiang et al. 2025): a ``RegisterNeurons``.

    ``heldout``: inputs that check the fix (default: every 4th input). ``settings``: ``DiscoverySettings``
    fields (``top_k``, ``detection_layer``, ``highest_layer``, ``sparsity``, ``batch_size``, ...) and
    ``threshold`` (absolute outlier threshold). Save the result with ``.save(path)``.
    """
    from sinkless.registers import DiscoverySettings, discover
    from sinkless.registers.inputs import split_heldout

    loaded = zoo.load(model) if isinstance(model, str) else as_loaded(model, processor)
    items = as_inputs(inputs, loaded.modality)
    if heldout is None:
        if len(items) < 2:
            raise SinklessError("need at least 2 inputs (one is held out to check the fix)", fix="pass more inputs, or heldout=")
        items, held = split_heldout(items)
    else:
        held = as_inputs(heldout, loaded.modality)
    names = {f.name for f in dataclasses.fields(DiscoverySettings)}
    unknown = sorted(set(settings) - names - {"threshold"})
    if unknown:
        raise SinklessError(f"unknown discovery settings {unknown}", fix=f"valid settings: {', '.join(sorted(names | {'threshold'}))}")
    threshold = settings.pop("threshold", None)
    if threshold is not None:
        settings["rule"] = dataclasses.replace(settings.get("rule", OutlierRule()), absolute=float(threshold))
    with evaluating(loaded.model):
        return discover(loaded, items, held, DiscoverySettings(**settings), progress=progress)
