"""The library functions behind ``sinkless denoise`` (DVT, Yang et al. 2024): Stage 1 on image files, and
training the Stage-2 denoiser from a folder. Inputs, the model and ``--out`` are checked before any work;
Stage-1 outputs are staged and moved into ``--out`` only when every image succeeded.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sinkless._io import atomic_write_json, staged_dir
from sinkless._version import __version__
from sinkless.denoise.figures import artifact_figure, stage1_figure
from sinkless.denoise.stage1 import Stage1Settings, denoise_image
from sinkless.denoise.train import DenoiserSettings, check_writable, collect_images, train_denoiser
from sinkless.denoise.views import check_model
from sinkless.devices import resolve_device, resolve_dtype
from sinkless.errors import SinklessError
from sinkless.images import IMAGE_SUFFIXES, expand_paths, unique_names

__all__ = ["denoise_files", "train_from_folder", "LOG_NAME"]

log = logging.getLogger(__name__)

LOG_NAME = "denoise.json"


def _load(model, device, dtype):
    from sinkless import zoo

    loaded = zoo.loaded_from(model, dtype=resolve_dtype(dtype), device=resolve_device(device))
    check_model(loaded)
    return loaded


RESERVED = ("artifact",)  # the mean artifact's files: an image of that name is written as artifact_2


def _unique(names: list[str]) -> list[str]:
    return unique_names(names, reserved=RESERVED)


def _check_not_inputs(out, inputs) -> None:
    """``--out`` must not be a folder of the input images: the per-image figures (NAME.png) would replace them."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    target = os.path.realpath(os.path.expanduser(out))
    if target in {os.path.realpath(path.parent) for path in expand_paths([str(i) for i in inputs], IMAGE_SUFFIXES)}:
        raise SinklessError(f"--out {out} is a folder of the input images: the figures NAME.png would replace them",
                            fix="choose another --out folder (a new subfolder is fine)")


def denoise_files(
    model,
    inputs: list[str],
    out: str | os.PathLike,
    settings: Stage1Settings = Stage1Settings(),
    *,
    device: str = "auto",
    dtype: str = "float32",
    figures: bool = True,
    progress: bool = True,
) -> dict:
    """Stage 1 on every image of ``inputs``; writes per image ``<name>.safetensors`` (raw, clean, artifact,
    residual: (h, w, D) each) and ``<name>.png`` (raw | clean | artifact | residual), the mean artifact over
    the images (``artifact.safetensors``, ``artifact.png``) and ``denoise.json`` (settings, timings, summaries)."""
    out = check_writable(out)
    images = collect_images(inputs)
    _check_not_inputs(out, inputs)
    loaded = _load(model, device, dtype)
    names = _unique([name for name, _ in images])
    started = time.perf_counter()
    rows, artifacts = [], []
    with staged_dir(out) as stage:
        for name, (_, image) in tqdm(list(zip(names, images)), desc="denoise", disable=not progress):
            result = denoise_image(loaded, image, settings, progress=False)
            meta = {"image": name, "model": loaded.name, "features": settings.features, "sinkless_version": __version__}
            save_file({k: v.contiguous() for k, v in result.tensors().items()}, str(stage / f"{name}.safetensors"), metadata=meta)
            if figures:
                side = loaded.image_spec.size if loaded.image_spec else None
                shown = image.resize((side, side)) if side else None  # what the model saw
                stage1_figure(shown, result, stage / f"{name}.png", title=f"{loaded.name} · {name}")
            artifacts.append(result.artifact)
            rows.append({"image": name, "timings": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.timings.items()},
                         **result.summary()})
            log.info("%s: %.1f s (views %.1f s, fit %.1f s), |G| / |raw| = %.3f", name, result.timings["total_s"],
                     result.timings["views_s"], result.timings["fit_s"], rows[-1]["artifact_relative"])
        shapes = {tuple(a.shape) for a in artifacts}
        mean_artifact = torch.stack(artifacts).mean(0) if len(shapes) == 1 else None
        if mean_artifact is not None:
            save_file({"artifact": mean_artifact.contiguous()}, str(stage / "artifact.safetensors"), metadata={"model": loaded.name, "images": str(len(artifacts))})
            if figures:
                artifact_figure(mean_artifact, stage / "artifact.png", title=f"{loaded.name}: position-tied artifact G, mean of {len(artifacts)} image(s)")
        report = {
            "sinkless_version": __version__, "model": loaded.name, "stage": 1, "settings": settings.to_dict(),
            "device": str(resolve_device(device)), "torch_threads": torch.get_num_threads(),
            "images": rows, "total_s": time.perf_counter() - started,
            "mean_artifact_norm": float(mean_artifact.norm(dim=-1).mean()) if mean_artifact is not None else None,
        }
        atomic_write_json(stage / LOG_NAME, report)
    return report


def train_from_folder(
    model,
    images: str | os.PathLike,
    out: str | os.PathLike,
    settings: DenoiserSettings = DenoiserSettings(),
    stage1: Stage1Settings = Stage1Settings(),
    *,
    resume: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """``sinkless denoise --train-denoiser``: the Stage-2 denoiser of ``model`` from the images in the folder ``images``."""
    out = check_writable(out)
    images = os.path.expanduser(images)
    if os.path.realpath(images) == os.path.realpath(out):
        raise SinklessError(f"--out {out} is the --images folder", fix="choose another --out folder (the denoiser's files would mix with the images)")
    if not os.path.isdir(images):
        raise SinklessError(f"--images {images} is not a folder", fix="pass a folder of image files")
    found = collect_images([str(images)])
    if limit is not None:
        if limit < 1:
            raise SinklessError(f"--limit must be >= 1, got {limit}")
        found = found[:limit]
    loaded = _load(model, device, dtype)
    return train_denoiser(loaded, found, out, settings, stage1, resume=resume, device=device, progress=progress)
