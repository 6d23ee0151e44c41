"""Self-distilled registers, PH-Reg (Chen et al. 2025, "Vision Transformers with Self-Distilled Registers"):
give a pretrained ViT register tokens and train a few of its parts, without labels, to reproduce its own
artifact-free features.

Teacher: the frozen original model; its target for an image is its final-norm patch features averaged
over shifted and flipped views (``sinkless.registers.multiview``), where position-tied artifacts wash
out. Student: a copy with ``registers`` register tokens (``add_registers``, init N(0, 1/D) as in PH-Reg)
whose registers, position embeddings, patch embedding and last block train (``train`` / ``train_blocks``
give more), with loss (1 − cosine) + MSE on the patch features (ours, optional: + ``key_weight`` · (1 − cosine) on the
last layer's patch keys, against the teacher's keys averaged over the same views), AdamW, lr 1e-4 → 5e-6 exponentially,
weight decay 0.01, batch 8 (PH-Reg's settings), through ``sinkless.training.train`` (seeded,
checkpoints, exact ``resume``, bf16 autocast on CUDA).

Ours, optional: ``teacher="ttr"`` takes the targets from the frozen model with test-time registers (Jiang et
al. 2025: its register neurons' activations moved into an extra token; neurons from a `sinkless fix` file or found
on the training images) instead of the plain model, so the student learns the training-free fix's features and
carries them in ordinary trained registers that plain transformers loads (with ``views=1`` the fixed model's own
features, no averaging). PH-Reg's teacher (``"original"``) stays the default.

Ours, optional: ``init`` starts the student from a finished distill folder (a second stage), and the part
``last_block_out`` trains the last block except what its attention reads (pre-attention norm, query/key/value
projections), so the last layer's attention maps, keys and values stay as the first stage left them.

Unlike PH-Reg, which recomputes the 10-view teacher target for every training crop, the default here
computes targets once for a pool of ``pool`` random crops and trains over it for several epochs: on a
CPU the teacher's views would otherwise cost 10x the student's forward at every step. ``pool=0`` gives
the paper's on-the-fly targets.

Output (``out``): a model folder that loads with ``sinkless.zoo.load(out)`` / ``--model out`` (and, for
DINOv2, with plain transformers as a ``Dinov2WithRegistersModel``), its ``preprocessor_config.json``, and
``distill_log.json`` (loss curve, settings, data, seconds). While training, checkpoints live in
``out/.training``; they are removed once the model is written.

Shapes: B batch, P patches, D width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from sinkless._io import atomic_write_json, check_writable, folder_lock, staged_dir, to_jsonable
from sinkless._version import __version__
from sinkless.adapters import Adapter, adapter_for
from sinkless.devices import autocast, resolve_amp, resolve_device
from sinkless.errors import SinklessError
from sinkless.images import IMAGE_SUFFIXES, ImageSpec, expand_paths, load_image, to_pixels
from sinkless.pretrained import _image_spec_from
from sinkless.registers.add import add_registers, register_parameter_name
from sinkless.registers.multiview import ViewSettings, denoise_views, final_patch_features
from sinkless.training import TrainSettings, train

__all__ = [
    "DistillSettings", "DistillResult", "distill", "augmented", "trainable_parameters", "training_photos", "TRAINING_PHOTOS", "PHOTO_SETTINGS",
    "PARTS", "LOG_NAME", "load_images",
]

log = logging.getLogger(__name__)

LOG_NAME = "distill_log.json"
STATE_DIR = ".training"
PARTS = ("registers", "positions", "patch_embed", "blocks", "last_block", "last_block_out", "final_norm", "all")
# in a block: the norm whose output feeds the query/key/value projections (DINOv2, ViT, CLIP / SigLIP)
PRE_ATTENTION_NORMS = ("norm1", "layernorm_before", "layer_norm1")
TEACHERS = ("original", "ttr")


DEFAULT_PART_LR = (("positions", 0.1), ("patch_embed", 0.1))  # docs/RESULTS.md, "Registers by training": the sweep


@dataclass(frozen=True)
class DistillSettings:
    """PH-Reg's settings (REFERENCE_NOTES §2) unless noted; ``pool`` and the crop sizes are ours."""

    registers: int = 16
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    final_lr: float = 5e-6
    schedule: str = "exponential"
    weight_decay: float = 0.01
    grad_clip: float | None = None  # PH-Reg clips nothing
    views: int = 10
    max_shift: int | None = None  # teacher shifts in patches; None: round(0.15 × grid side)
    fill: str = "white"
    image_size: int | None = None  # side of the square training crops; None: the model's input size
    pool: int = 256  # crops with precomputed teacher targets; 0: a new crop and target every step (PH-Reg)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # crop side / shorter image side
    train: tuple[str, ...] = ("registers", "positions", "patch_embed", "blocks")
    train_blocks: int = 1  # how many of the last blocks train when "blocks" is in ``train``
    # ((part, multiplier), ...): a part's learning rate as a multiple of lr. None: DEFAULT_PART_LR for the trained parts
    # among them (ours: on a few thousand crops, position and patch embeddings at PH-Reg's full lr drift and wreck held-out features)
    part_lr: tuple[tuple[str, float], ...] | None = None
    register_std: float | None = 1e-6  # init of the new registers (ours, measured: better held-out features); None: 1/sqrt(D) (PH-Reg)
    mse_weight: float = 1.0
    # ours: + key_weight x (1 - cosine) between the student's last-layer patch keys and the teacher's keys averaged over
    # the same views (where an artifact's key stands apart, the averaged one does not: docs/RESULTS.md); 0: PH-Reg's loss
    key_weight: float = 0.0
    # ours: whose features are the target. "original": the frozen model (PH-Reg). "ttr": the frozen model with test-time
    # registers (Jiang et al. 2025; neurons from ``teacher_neurons``, a `sinkless fix` file, or found on the training
    # images): the training-free fix's features become the student's, in ordinary trained registers (docs/REGISTERS.md)
    teacher: str = "original"
    teacher_neurons: str | None = None
    augment: bool = False  # ours: each photo also turned 90° and 180° and colour-jittered (4x the images, ``augmented``)
    # ours: the student starts from this finished distill folder (same model, same number of registers) instead of the
    # model with fresh registers: a second stage, e.g. ``train=("last_block_out", "final_norm")`` on other targets
    init: str | None = None
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    amp: str = "auto"  # bf16 autocast for teacher and student: auto (where the hardware has native bf16: CUDA,
    # CPUs with AMX / AVX512-BF16; PH-Reg trains in bf16 autocast), bf16, off

    def __post_init__(self) -> None:
        def whole(name: str, value, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SinklessError(f"{name} must be a whole number >= {low}, got {value!r}")

        whole("registers", self.registers, 1)
        whole("batch_size", self.batch_size, 1)
        whole("pool", self.pool, 0)
        whole("train_blocks", self.train_blocks, 1)
        if self.image_size is not None:
            whole("image_size", self.image_size, 1)
        for name in ("lr", "final_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SinklessError(f"{name} must be a positive number, got {value!r}")
        if self.register_std is not None and not (isinstance(self.register_std, (int, float)) and math.isfinite(self.register_std)
                                                  and self.register_std > 0):
            raise SinklessError(f"register_std must be a positive number, got {self.register_std!r}")
        if self.teacher not in TEACHERS:
            raise SinklessError(f"unknown teacher {self.teacher!r}", fix=f"choose from {', '.join(TEACHERS)}")
        if self.teacher_neurons is not None and self.teacher != "ttr":
            raise SinklessError("teacher_neurons is given but the teacher is not 'ttr'", fix="set teacher='ttr' (--teacher ttr), or drop the neurons file")
        if self.init is not None and not (isinstance(self.init, (str, os.PathLike)) and os.fspath(self.init).strip()):
            raise SinklessError(f"init must be the path of a finished distill folder, got {self.init!r}")
        if not isinstance(self.augment, bool):
            raise SinklessError(f"augment must be True or False, got {self.augment!r}")
        for name in ("mse_weight", "key_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise SinklessError(f"{name} must be >= 0, got {value!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise SinklessError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        unknown = sorted(set(self.train) - set(PARTS))
        if unknown or not self.train:
            raise SinklessError(f"unknown trainable parts {unknown or '(none given)'}", fix=f"choose from {', '.join(PARTS)}")
        for part, multiplier in self.part_lr or ():
            if part not in self.train or part == "all":
                fix = (f"--part-lr takes a part's name ({', '.join(p for p in PARTS if p != 'all')}), not all" if part == "all"
                       else f"add {part} to --train, or give --part-lr only for {', '.join(self.train)}" if part in PARTS
                       else f"{part!r} is no part; --part-lr takes one of the trained parts: {', '.join(self.train)}")
                raise SinklessError(f"part_lr names {part!r}, which is not among the trained parts {list(self.train)}", fix=fix)
            if not (isinstance(multiplier, (int, float)) and math.isfinite(multiplier) and multiplier > 0):
                raise SinklessError(f"the learning-rate multiplier of {part} must be a positive number, got {multiplier!r}")
        self.view_settings()  # views, max_shift, fill
        self.train_settings()  # steps, schedule, checkpoint_every...
        resolve_amp(self.amp, "cpu")  # a known choice

    def lr_multipliers(self) -> dict[str, float]:
        """{part: multiplier of lr}: ``part_lr`` as given, or DEFAULT_PART_LR for the parts this run trains."""
        if self.part_lr is not None:
            return dict(self.part_lr)
        return {part: multiple for part, multiple in DEFAULT_PART_LR if part in self.train}

    def view_settings(self) -> ViewSettings:
        return ViewSettings(views=self.views, max_shift=self.max_shift, fill=self.fill)

    def train_settings(self, amp: bool = False) -> TrainSettings:
        """The training loop's settings; ``amp``: bf16 autocast on the device (``resolve_amp(self.amp, device)``)."""
        return TrainSettings(amp=amp, cpu_amp=amp, 
            steps=self.steps, lr=self.lr, final_lr=self.final_lr, schedule=self.schedule, weight_decay=self.weight_decay,
            grad_clip=self.grad_clip, seed=self.seed, checkpoint_every=self.checkpoint_every, log_every=self.log_every,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What `compare --fix distilled` distils with when given no folder: the bundled photos are far fewer than PH-Reg's
# Flickr30k; registers + last block + position embeddings (at 0.1 x lr) generalised best per CPU second in the
# sweep of docs/RESULTS.md ("Registers by training"): 300 steps on a pool of 512 crops of 224 px, ~8 CPU-minutes.
PHOTO_SETTINGS = DistillSettings(train=("registers", "blocks", "positions"), max_shift=3, pool=512, steps=300, image_size=224)


@dataclass
class DistillResult:
    out: Path
    log: dict
    student: nn.Module | None = None


# -- data ------------------------------------------------------------------------------------------
def load_images(images: str | os.PathLike | Sequence) -> tuple[list[Image.Image], list[str]]:
    """Training images and their names from paths / folders / globs, PIL images (named ``image0``, ...) or
    ``(name, PIL image)`` pairs; a clear error for none."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    images = list(images or [])
    if images and all(isinstance(item, Image.Image) for item in images):
        return [im.convert("RGB") for im in images], [f"image{i}" for i in range(len(images))]
    if images and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Image.Image) for item in images):
        return [im.convert("RGB") for _, im in images], [str(name) for name, _ in images]
    if not images:
        raise SinklessError("no training images given", fix="pass --images DIR_OR_GLOB with natural photographs (not your evaluation images)")
    paths = expand_paths([str(item) for item in images], IMAGE_SUFFIXES)
    paths = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise SinklessError(f"no image files in {[str(i) for i in images]}", fix=f"pass files ending in {', '.join(IMAGE_SUFFIXES)}")
    return [load_image(p) for p in paths], [str(p) for p in paths]


# Natural photographs installed with sinkless's dependencies that are in none of the evaluation sets
# (docs/MINI_SET.md uses astronaut, camera, chelsea, coffee, coins, motorcycle_left, quokka, rocket;
# motorcycle_right, the other half of that stereo pair, is left out as a near-duplicate).
TRAINING_PHOTOS = ("brick", "grass", "gravel", "moon", "clock", "page", "text", "cell", "hubble_deep_field", "retina",
                   "immunohistochemistry", "grace_hopper")


def training_photos(exclude: Sequence[Image.Image] = ()) -> list[tuple[str, Image.Image]]:
    """``TRAINING_PHOTOS`` (scikit-image's and matplotlib's sample photos), minus any that look like an image
    of ``exclude`` (same 32×32 thumbnail up to small differences): distillation data that never overlaps
    the evaluation images."""
    import numpy as np

    photos = []
    for name in TRAINING_PHOTOS:
        try:
            if name == "grace_hopper":
                import matplotlib.cbook

                with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
                    array = np.asarray(Image.open(handle).convert("RGB"))
            else:
                from skimage import data

                array = getattr(data, name)()
        except Exception as error:  # a sample file this installation lacks (some are downloaded on demand)
            log.debug("training photo %s unavailable (%s)", name, error)
            continue
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        photos.append((name, Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))))
    excluded = [_thumb(image) for image in exclude]
    kept = [(name, image) for name, image in photos if not any(_same(_thumb(image), other) for other in excluded)]
    if len(kept) < len(photos):
        log.info("left out %d training photos that are among the evaluation images", len(photos) - len(kept))
    return kept


JITTER = {"Color": (0.3, 1.6), "Brightness": (0.7, 1.3), "Contrast": (0.7, 1.3)}  # factor ranges, in this order


def augmented(images: Sequence[Image.Image], seed: int = 7) -> list[Image.Image]:
    """Each image as it is, turned 90° and 180°, and colour-jittered (saturation 0.3-1.6x, brightness and
    contrast 0.7-1.3x, drawn per image with ``random.Random(seed)``): 4x the images, for a few photos.

    Measured in docs/RESULTS.md ("Registers by training"): on ~40 photos the copies let a student with more
    trained blocks generalise better (they are no substitute for new photographs at the default size)."""
    import random

    from PIL import ImageEnhance

    draw = random.Random(seed)
    out = []
    for image in images:
        jittered = image
        for name, (low, high) in JITTER.items():
            jittered = getattr(ImageEnhance, name)(jittered).enhance(draw.uniform(low, high))
        out += [image, image.transpose(Image.ROTATE_90), image.transpose(Image.ROTATE_180), jittered]
    return out


def _thumb(image: Image.Image):
    import numpy as np

    thumb = np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32).ravel()
    return (thumb - thumb.mean()) / (thumb.std() + 1e-6)


def _same(a, b) -> bool:
    return float((a * b).mean()) > 0.95  # correlation of the normalised thumbnails


def _identity(images: Sequence[Image.Image]) -> str:
    """A short digest of the training images' pixels: a checkpoint resumes only on the same data."""
    digest = hashlib.sha256()
    for image in images:
        thumb = image.resize((32, 32), Image.BILINEAR)
        digest.update(f"{image.size}".encode())
        digest.update(thumb.tobytes())
    return digest.hexdigest()[:16]


def _crop(image: Image.Image, scale: tuple[float, float], generator: torch.Generator) -> Image.Image:
    """A random square crop (side = scale × the shorter side) of ``image``, flipped left-right half the time."""
    width, height = image.size
    u = torch.rand(4, generator=generator).tolist()
    side = max(1, int(min(width, height) * (scale[0] + (scale[1] - scale[0]) * u[0])))
    left, top = int(u[1] * (width - side + 1)), int(u[2] * (height - side + 1))
    crop = image.crop((left, top, left + side, top + side))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if u[3] < 0.5 else crop


def _crops(images: Sequence[Image.Image], n: int, settings: DistillSettings, spec: ImageSpec, size: int,
           generator: torch.Generator) -> torch.Tensor:
    picks = torch.randint(len(images), (n,), generator=generator).tolist()
    crops = [_crop(images[i], settings.crop_scale, generator) for i in picks]
    return to_pixels(crops, spec, size=size)  # (n, 3, S, S)


# -- the student -----------------------------------------------------------------------------------
def trainable_parameters(student: nn.Module, adapter: Adapter, parts: Sequence[str], train_blocks: int = 1) -> dict[str, nn.Parameter]:
    """Freeze ``student`` except ``parts`` (see ``PARTS``); the trainable parameters by name."""
    return {name: p for name, (p, _) in _trainable(student, adapter, parts, train_blocks).items()}


def _trainable(student: nn.Module, adapter: Adapter, parts: Sequence[str], train_blocks: int = 1) -> dict[str, tuple[nn.Parameter, str]]:
    """``trainable_parameters`` with the part each parameter belongs to (``all`` when only ``all`` names it)."""
    embeddings = adapter.patch_embed.rpartition(".")[0]
    n_layers = adapter.num_layers(student)
    if train_blocks > n_layers:
        raise SinklessError(f"train_blocks={train_blocks} but the model has {n_layers} blocks", fix=f"pass --train-blocks {n_layers} or fewer")
    blocks = tuple(adapter.block(i) + "." for i in range(n_layers - train_blocks, n_layers))
    last = adapter.block(n_layers - 1) + "."
    register = register_parameter_name(student)
    attention_inputs = _attention_inputs(student, adapter, n_layers - 1) if "last_block_out" in parts else ()

    def part(name: str) -> str | None:
        checks = (
            ("registers", name == register),
            ("positions", name.startswith(embeddings + ".") and "position_embedding" in name),
            ("patch_embed", name.startswith(adapter.patch_embed + ".")),
            # the last block after its attention weights: what the last layer's queries, keys and values depend on stays
            ("last_block_out", name.startswith(last) and not name.startswith(attention_inputs)),
            ("last_block", name.startswith(last)),  # before "blocks": the last block as a part of its own (its own lr)
            ("blocks", name.startswith(blocks)),
            ("final_norm", adapter.final_norm is not None and name.startswith(adapter.final_norm + ".")),
        )
        named = next((which for which, hit in checks if hit and which in parts), None)
        return named or ("all" if "all" in parts else None)

    student.requires_grad_(False)
    chosen = {name: (p, which) for name, p in student.named_parameters() if (which := part(name)) is not None}
    for p, _ in chosen.values():
        p.requires_grad_(True)
    assert register in chosen or "registers" not in parts, register
    return chosen


def _attention_inputs(model: nn.Module, adapter: Adapter, layer: int) -> tuple[str, ...]:
    """Parameter-name prefixes of block ``layer``'s query, key and value projections and the norm before them."""
    block = adapter.block(layer)
    norms = [f"{block}.{name}." for name in PRE_ATTENTION_NORMS if hasattr(model.get_submodule(block), name)]
    if adapter.qkv is None or len(norms) != 1:
        raise SinklessError(f"the {adapter.family} adapter does not say which weights feed the last layer's attention",
                            fix="train last_block instead of last_block_out")
    return (*norms, *(f"{block}.{name}." for name in adapter.qkv))


def _feature_loss(student_features: torch.Tensor, target: torch.Tensor, mse_weight: float,
                  student_keys: torch.Tensor | None = None, key_target: torch.Tensor | None = None,
                  key_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """(1 − cos) + mse_weight · MSE on the patch features, + key_weight · (1 − cos) on the last-layer keys if given."""
    features = student_features.float()  # (B, P, D)
    cosine = F.cosine_similarity(features, target, dim=-1, eps=1e-8).mean()
    mse = F.mse_loss(features, target)
    out = {"loss": (1 - cosine) + mse_weight * mse, "cosine": cosine.detach(), "mse": mse.detach()}
    if student_keys is not None:
        key_cosine = F.cosine_similarity(student_keys.float(), key_target, dim=-1, eps=1e-8).mean()
        out["loss"] = out["loss"] + key_weight * (1 - key_cosine)
        out["key_cosine"] = key_cosine.detach()
    return out


# -- output folder ---------------------------------------------------------------------------------
def _check_out(out: Path, resume: bool) -> bool:
    """Validate ``out`` before any work; returns whether it holds a finished result (resume: nothing to do)."""
    finished = (out / LOG_NAME).exists() and (out / "config.json").exists()
    if finished and not resume:
        raise SinklessError(f"{out} already holds a distilled model", fix="choose a new --out folder (or pass --resume to keep it)")
    if out.is_dir() and not resume and (out / STATE_DIR).exists():
        raise SinklessError(f"{out} holds an unfinished distillation", fix="pass --resume to continue it, or choose a new --out folder")
    if out.is_dir() and not finished and not (out / STATE_DIR).exists() and any(out.iterdir()):
        raise SinklessError(f"--out {out} is not empty" + (" and holds no distillation to resume" if resume else ""),
                            fix="choose a new or empty folder: the model files would mix with what is there")
    check_writable(out, directory=True, what="--out")  # also: a file, not a folder
    return finished


def read_log(folder: Path, fix: str = "choose a new --out folder (this one's log is damaged)") -> dict:
    """The ``distill_log.json`` of a distilled model folder; one clear error (with ``fix``) when it is not a JSON object."""
    path = Path(folder) / LOG_NAME
    try:
        logged = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SinklessError(f"cannot read {path}: {error}", fix=fix) from None
    if not isinstance(logged, dict):
        raise SinklessError(f"{path} is not a distillation log (a JSON object)", fix=fix)
    return logged


def _model_key(model) -> str:
    """What names a model for resuming, however it was spelled: a zoo name or hub id as given, a local folder by its
    real path (``student`` from one folder and ``/abs/student`` from another are the same model), a loaded model by
    its name."""
    from sinkless.zoo import ZOO

    if not isinstance(model, (str, os.PathLike)):
        return str(getattr(model, "name", None) or type(model).__name__)
    text = os.fspath(model)
    if text in ZOO:
        return text
    local = Path(text).expanduser()
    return os.path.realpath(local) if local.exists() else text


def _check_finished_job(out: Path, logged: dict, model, pictures: Sequence[Image.Image]) -> None:
    """``--resume`` on a finished run with the same settings: refused when the model or the images differ (the finished
    model is of other ones), as a checkpoint is."""
    changed, key = [], _model_key(model)
    if "model_key" in logged and logged["model_key"] != key:
        changed.append(f"model {logged['model_key']} -> {key}")
    data = logged.get("data")
    digest = data.get("digest") if isinstance(data, dict) else None
    if digest is not None and digest != _identity(pictures):
        changed.append("other training images")
    if changed:
        raise SinklessError(
            f"{out} holds a finished distillation of another job ({', '.join(changed)})",
            fix="choose a new --out folder for this one (or resume with the first run's command line)",
        )


def _check_finished_settings(out: Path, logged: dict, settings: DistillSettings) -> None:
    """``--resume`` on a finished run: fine with the same settings (nothing to do), refused with others.

    A finished run keeps no checkpoint, so it cannot be continued for more steps or retrained with other settings;
    answering "nothing to do" to a changed command would pass the old model off as the new one.
    """
    before = logged.get("distill_settings") or {}
    now = json.loads(json.dumps(settings.to_dict()))  # tuples as the log's lists
    changed = sorted(k for k in now if k in before and now[k] != before[k])
    if changed:
        said = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise SinklessError(
            f"{out} holds a finished distillation with other settings ({said}); --resume continues an interrupted run "
            "and a finished one keeps no checkpoint to continue from",
            fix="choose a new --out folder to distil with these settings (or resume with the first run's command line)",
        )


def _write_folder(student: nn.Module, out: Path, spec: ImageSpec, size: int, provenance: dict, log_data: dict) -> None:
    """The model folder, all at once: config + weights + preprocessor config + the JSON log."""
    student.config.sinkless_distill = provenance
    from sinkless.zoo import _quiet_transformers

    with staged_dir(out) as stage, _quiet_transformers():
        student.save_pretrained(stage)
        (stage / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "do_center_crop": True, "crop_size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(spec.mean), "image_std": list(spec.std),
            "do_convert_rgb": True,
        }, indent=2) + "\n")
        atomic_write_json(stage / LOG_NAME, log_data)


# -- the job ---------------------------------------------------------------------------------------
def distill(
    model,
    images,
    out: str | os.PathLike,
    settings: DistillSettings = DistillSettings(),
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    heldout=None,
    heldout_every: int = 50,
) -> DistillResult:
    """Self-distil registers into ``model`` (zoo name, hub id, folder, ``Loaded`` or a HF model object) on ``images`` into ``out``.

    ``images``: paths / folders / globs or PIL images (natural photographs; not your evaluation images).
    Everything is validated before the long work starts. With ``resume`` an interrupted run continues
    from its last checkpoint and ends with the same weights as an uninterrupted run. ``heldout``: images
    (never trained on) whose student-vs-teacher-target cosine is logged every ``heldout_every`` steps.
    """
    from sinkless import zoo

    out = Path(out).expanduser()
    finished = _check_out(out, resume)
    if finished:
        logged = read_log(out)
        _check_finished_settings(out, logged, settings)
    device = resolve_device(device)
    pictures, names = load_images(images)
    if finished:
        _check_finished_job(out, logged, model, pictures)
        log.warning("%s already holds this distillation, finished: nothing to do", out)
        return DistillResult(out, logged)
    held = load_images(heldout)[0] if heldout is not None else []
    loaded = zoo.loaded_from(model)  # a name / folder, a Loaded or a model object
    teacher, adapter, spec = loaded.model, loaded.adapter, loaded.image_spec
    student = add_registers(teacher, settings.registers, std=_register_std(settings, teacher), seed=settings.seed)  # checks the family
    if settings.init is not None:
        _start_from(student, settings.init)
    if spec is None:  # wrapped with processor=False: the config's size and ImageNet statistics, as denoise_views does
        spec = _image_spec_from(None, teacher.config, adapter)
        log.warning("%s came without image preprocessing: crops of %d px normalised with ImageNet statistics (pass its "
                    "image processor to as_loaded to use its own)", loaded.name, spec.size)
        loaded = dataclasses.replace(loaded, image_spec=spec)
    size = settings.image_size or spec.size
    patch = adapter.patch_size(teacher)
    if size % patch:
        raise SinklessError(f"image_size {size} is not a multiple of the patch size {patch}", fix=f"e.g. {size // patch * patch or patch}")
    use_amp = resolve_amp(settings.amp, device)
    train_settings = settings.train_settings(use_amp)
    started, cpu_started = time.perf_counter(), time.process_time()
    teacher_fix, teacher_info = _teacher_fix(loaded, pictures, names, settings, progress)  # before any file is written

    home, was_training = next(teacher.parameters()).device, teacher.training
    teacher.to(device).eval()  # used under no_grad only; put back where it was at the end
    student.to(device).train()
    s_adapter = adapter_for(student)
    trainable = _trainable(student, s_adapter, settings.train, settings.train_blocks)
    params = {name: p for name, (p, _) in trainable.items()}
    multipliers = settings.lr_multipliers()
    lr_scale = {name: multipliers[part] for name, (_, part) in trainable.items() if part in multipliers}
    views = settings.view_settings()
    data = {"n_images": len(pictures), "images": names, "digest": _identity(pictures), "image_size": size, "pool": settings.pool}
    if settings.augment:
        pictures = augmented(pictures)
        data["n_augmented"] = len(pictures)
    model_key = _model_key(model)
    meta = {
        "job": "distill", "model": loaded.name, "student": type(student).__name__, "data": data,
        "distill_settings": settings.to_dict(), "teacher": teacher_info, "trainable": {"parts": list(settings.train), "parameters": sum(p.numel() for p in params.values())},
        # what a checkpoint must match to be resumed (the step budget and bookkeeping may change, as in training.py)
        "model_key": model_key,
        "job_key": {"model": model_key, **({"init": _model_key(settings.init)} if settings.init is not None else {}), "data": {k: v for k, v in data.items() if k != "images"},
                    "settings": {k: v for k, v in settings.to_dict().items() if k not in ("steps", "checkpoint_every", "log_every")}},
    }

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    busy = SinklessError(f"another `sinkless distill` is writing into {out} right now",
                         fix="wait for it to finish (or --resume it afterwards), or choose another --out folder")
    # held while this one trains, so a second distill into the same --out is refused; released before the final
    # write, which locks the folder itself while it moves the files in
    with folder_lock(out, busy):
        try:
            # teacher targets for the pool: deterministic from the seed, so a resumed run rebuilds the same ones
            t0 = time.perf_counter()
            pool_pixels = pool_targets = pool_keys = None
            with_keys = settings.key_weight > 0
            held_pixels = to_pixels(held, spec, size=size) if held else None  # (H, 3, S, S)
            held_targets = None
            with teacher_fix:
                if settings.pool:
                    generator = torch.Generator().manual_seed(settings.seed * 7_919 + 1)
                    pool_pixels = _crops(pictures, settings.pool, settings, spec, size, generator)  # (M, 3, S, S)
                    pool_targets = _teacher_targets(loaded, pool_pixels, views, generator, device, progress, use_amp, keys=with_keys)
                    if with_keys:
                        pool_targets, pool_keys = pool_targets  # (M, P, D) each, on CPU
                if held_pixels is not None:
                    held_targets = _teacher_targets(loaded, held_pixels, views, torch.Generator().manual_seed(12_345), device, False, use_amp)
            teacher_seconds = time.perf_counter() - t0

            def evaluate(t: int, row: dict) -> dict | None:
                if held_pixels is None or (t % heldout_every and t != train_settings.steps):
                    return None
                with torch.no_grad():
                    student.eval()
                    features = final_patch_features(student, held_pixels.to(device), s_adapter).float().cpu()
                    student.train()
                return {"heldout_cosine": float(F.cosine_similarity(features, held_targets, dim=-1).mean())}

            def batch(t: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
                if pool_pixels is None:  # PH-Reg: fresh crops, fresh views, teacher every step
                    pixels = _crops(pictures, settings.batch_size, settings, spec, size, generator)
                    with torch.no_grad(), autocast(device, use_amp, cpu=True), teacher_fix:
                        target = denoise_views(loaded, pixels.to(device), views, generator=generator, image_spec=spec, keys=with_keys)
                    target, key_target = target if with_keys else (target, None)
                    return pixels, target.float(), None if key_target is None else key_target.float()
                index = _epoch_indices(t, settings)
                return pool_pixels[index], pool_targets[index], None if pool_keys is None else pool_keys[index]

            def step(t: int, generator: torch.Generator) -> dict:
                pixels, target, key_target = batch(t, generator)
                features = final_patch_features(student, pixels.to(device), s_adapter, keys=with_keys)  # (B, P, D), with keys a pair
                features, keys = features if with_keys else (features, None)
                return _feature_loss(features, target.to(device).float(), settings.mse_weight, student_keys=keys,
                                     key_target=None if key_target is None else key_target.to(device).float(), key_weight=settings.key_weight)

            result = train(params, step, train_settings, out / STATE_DIR, meta=meta, resume=resume, progress=progress,
                           desc=f"distill {loaded.name}", on_log=evaluate, lr_scale=lr_scale or None)
        except BaseException:
            if not (out / STATE_DIR / "checkpoint.pt").exists():  # nothing worth keeping: leave no trace
                shutil.rmtree(out if created else out / STATE_DIR, ignore_errors=True)
            raise
        finally:
            teacher.to(home).train(was_training)

    student.eval().requires_grad_(False).to("cpu")
    log_data = {
        **result.to_dict(),
        "job": "distill",
        "out": str(out),
        "seconds": {"teacher_targets": round(teacher_seconds, 3), "training": round(result.seconds, 3),
                    "total_this_run": round(time.perf_counter() - started, 3)},
        "cpu_seconds_this_run": round(time.process_time() - cpu_started, 3),
        "views": dataclasses.asdict(views),
        "precision": "bf16 autocast" if use_amp else "float32",
    }
    provenance = {"teacher": loaded.name, "registers": settings.registers, "steps": settings.steps, "sinkless_version": __version__}
    _write_folder(student, out, spec, size, provenance, to_jsonable(log_data))
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    log.info("wrote the distilled model to %s (%.0f s)", out, time.perf_counter() - started)
    return DistillResult(out, log_data, student)


def _start_from(student: nn.Module, init: str | os.PathLike) -> None:
    """``student`` (the model with fresh registers) given the weights of ``init``: a model of the same architecture,
    width, depth and number of registers, e.g. an earlier `sinkless distill` folder of the same model."""
    from sinkless import zoo

    try:
        source = zoo.load(os.path.expanduser(os.fspath(init))).model
    except SinklessError as error:
        raise SinklessError(f"--init: {error.problem}", fix=error.fix) from None
    mine, theirs = student.state_dict(), source.state_dict()
    wrong = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k].shape != theirs[k].shape]
    if type(source) is not type(student) or wrong:
        n = getattr(source.config, "num_register_tokens", 0)
        raise SinklessError(
            f"--init {init} is a {type(source).__name__} with {n} registers that does not fit this run's student, a "
            f"{type(student).__name__} with {student.config.num_register_tokens} registers"
            + (f" ({len(wrong)} weights differ in name or shape, e.g. {wrong[0]})" if wrong else ""),
            fix="pass a distill folder of the same --model, with --registers as it had",
        )
    student.load_state_dict(theirs)


DISCOVERY_IMAGES = 64  # training images the test-time-register teacher's neurons are found on (every 4th held out)


def _teacher_fix(loaded, pictures: Sequence[Image.Image], names: Sequence[str], settings: DistillSettings,
                 progress: bool) -> tuple[contextlib.AbstractContextManager, dict]:
    """What the teacher runs under while it computes targets, and what the log records of it: nothing (PH-Reg), or
    test-time registers whose neurons come from ``settings.teacher_neurons`` or are found on the training images."""
    if settings.teacher == "original":
        return contextlib.nullcontext(), {"kind": "original"}
    from sinkless.registers.discovery import discover
    from sinkless.registers.inputs import split_heldout
    from sinkless.registers.ttr import TestTimeRegisters, load_neurons
    from sinkless.scan.inputs import ImageInput

    if settings.teacher_neurons is not None:
        neurons, source = load_neurons(settings.teacher_neurons), str(settings.teacher_neurons)
    else:
        items = [ImageInput(name, image) for name, image in zip(names[:DISCOVERY_IMAGES], pictures[:DISCOVERY_IMAGES])]
        if len(items) < 2:
            raise SinklessError("the test-time-register teacher needs at least 2 training images to find its register neurons on",
                                fix="pass more images, or a neurons file from `sinkless fix --out FILE` (--teacher-neurons)")
        chosen, heldout = split_heldout(items)
        neurons = discover(loaded, chosen, heldout, progress=progress)
        source = f"found on {len(chosen)} of the training images ({len(heldout)} more held out)"
    fix = TestTimeRegisters(loaded, neurons)  # checks the neurons against the model
    if not fix.layers:
        log.warning("no register neurons in %s: the teacher is the plain model (as --teacher original)", source)
    return fix, {"kind": "ttr", "neurons": {str(layer): ids for layer, ids in neurons.by_layer().items()}, "source": source}


def _register_std(settings: DistillSettings, model: nn.Module) -> float:
    return settings.register_std if settings.register_std is not None else float(model.config.hidden_size) ** -0.5


def _epoch_indices(t: int, settings: DistillSettings) -> torch.Tensor:
    """Pool indices of step ``t``: a fresh seeded permutation of the pool each epoch (no state to resume)."""
    m, b = settings.pool, settings.batch_size
    samples = range(t * b, (t + 1) * b)
    perms: dict[int, torch.Tensor] = {}
    index = []
    for s in samples:
        epoch = s // m
        if epoch not in perms:
            perms[epoch] = torch.randperm(m, generator=torch.Generator().manual_seed(settings.seed * 104_729 + epoch))
        index.append(int(perms[epoch][s % m]))
    return torch.tensor(index)


@torch.no_grad()
def _teacher_targets(loaded, pixels: torch.Tensor, views: ViewSettings, generator: torch.Generator,
                     device: torch.device, progress: bool, amp: bool = False,
                     keys: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-view denoised teacher features of every pool crop, one crop's views per forward: (M, P, D) on CPU
    (``keys``: and the views' averaged last-layer keys, a pair)."""
    out = []
    for i in tqdm(range(pixels.shape[0]), desc="teacher targets", disable=not progress, dynamic_ncols=True):
        with autocast(device, amp, cpu=True):
            target = denoise_views(loaded, pixels[i : i + 1].to(device), views, generator=generator, image_spec=loaded.image_spec,
                                   keys=keys)
        out.append([x.float().cpu() for x in (target if keys else (target,))])
    features, *key = (torch.cat(parts) for parts in zip(*out))
    return (features, key[0]) if keys else features
