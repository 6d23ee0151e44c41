"""Training DVT's Stage-2 denoiser (Yang et al. 2024) on the Stage-1 outputs of a folder of images.

Two phases, both resumable from the ``--out`` folder: (1) Stage 1 on every image (the expensive
part: seconds per image), each image's raw and clean features saved as ``stage1/<i>_<name>.safetensors``
as soon as it is done, so an interrupted run skips the images it already has; (2) the block trained
with the shared loop (``sinkless.training.train``: seeded, checkpointed, JSON log) to map raw
features to clean ones, loss MSE + (1 - cos). The finished denoiser is ``denoiser.safetensors`` +
``config.json``; ``train_log.json`` holds the settings, the Stage-1 timings and the loss curve.

DVT's own settings (REFERENCE_NOTES §1): AdamW betas (0.9, 0.999), weight decay 1e-5, warm-up over 15 %
of the steps, cosine to 1e-6, lr 2e-4·sqrt(batch/256) over 50,000 steps of 128 images. Here the same
optimiser and schedule, with a larger lr for a CPU-sized budget (a few thousand steps of 8 images).

Shapes: N images, h x w patch grid, D width, B batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sinkless import _io
from sinkless._io import atomic_path, atomic_write_json
from sinkless._version import __version__
from sinkless.denoise.stage1 import Stage1Settings, denoise_image
from sinkless.denoise.stage2 import CONFIG, WEIGHTS, Denoiser, DenoiserConfig, check_init, save_denoiser
from sinkless.denoise.views import check_model
from sinkless.devices import resolve_device
from sinkless.errors import SinklessError
from sinkless.images import IMAGE_SUFFIXES, expand_paths, load_image
from sinkless.training import LOG, TrainSettings, train

__all__ = ["DenoiserSettings", "train_denoiser", "collect_images", "check_writable", "denoising_loss"]

log = logging.getLogger(__name__)

TARGETS = "stage1"
SELECT = ("last", "best")
# clean: DVT's target, F at the input's patch centres (it also smooths what the views do not agree on);
# raw-minus-artifact: the input's own features minus the image's fitted position-tied map G (removes only
# what sits at grid positions in every view, keeps the detail; see docs/DENOISE.md)
TARGET_KINDS = ("clean", "raw-minus-artifact")


@dataclass(frozen=True)
class DenoiserSettings:
    """The Stage-2 training run (Stage 1's own settings are a ``Stage1Settings``)."""

    steps: int = 2000
    batch: int = 8
    lr: float = 5e-4
    final_lr: float = 1e-6
    warmup: float = 0.15  # share of the steps
    weight_decay: float = 1e-5
    holdout: int = 0  # the last N images are not trained on; the log reports the denoiser on them
    seed: int = 0
    checkpoint_every: int = 200
    init: str = "identity"  # identity (the block starts as the identity) or dvt (DVT's random init); see stage2.Denoiser
    view_pairs: int = 8  # per training image, this many of its Stage-1 crops join as (raw, F at their centres) pairs
    target: str = "clean"  # what the block learns to output: Stage 1's clean field F (DVT), or raw-minus-artifact: its input - G
    select: str = "last"  # which weights to keep: the last step's, or (best) those of the logged step closest to the held-out targets

    # The held-out images are scored every ``log_every`` steps (each row of the loss curve gets
    # ``holdout_cosine``, the block's cosine to their own Stage-1 targets, which needs no clean twin);
    # ``select="best"`` keeps the weights of the row with the highest one (docs/RESULTS.md: on 179 photos the
    # score rises, then stays flat; the tenth session saw the share on other, 224-px crops peak early).

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SinklessError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SinklessError(f"the learning rate must be a positive number, got {self.lr}")
        if self.holdout < 0:
            raise SinklessError(f"holdout must be >= 0, got {self.holdout}")
        if not isinstance(self.view_pairs, int) or self.view_pairs < 0:
            raise SinklessError(f"view_pairs must be a whole number >= 0, got {self.view_pairs!r}")
        check_init(self.init)
        if self.target not in TARGET_KINDS:
            raise SinklessError(f"unknown denoiser target {self.target!r}", fix=f"choose one of {', '.join(TARGET_KINDS)}")
        if self.select not in SELECT:
            raise SinklessError(f"unknown selection {self.select!r}", fix=f"choose one of {', '.join(SELECT)}")
        if self.select == "best" and self.holdout < 1:
            raise SinklessError("--select best picks the step on held-out images, and none are held out",
                                fix="add --holdout N (N of the training images, not the evaluation ones)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DVT's loss: MSE + (1 - mean cosine) over patch features (..., D)."""
    return F.mse_loss(pred, target) + 1 - F.cosine_similarity(pred, target, dim=-1).mean()


def check_writable(out: str | os.PathLike) -> Path:
    """A clear error, before any work, when ``out`` cannot be a folder we write into (``sinkless._io``'s check)."""
    return _io.check_writable(out, directory=True, what="--out")


def collect_images(inputs: list[str] | str) -> list[tuple[str, object]]:
    """``(name, PIL image)`` for every image file named by ``inputs``, all read (and checked) up front."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not inputs:
        raise SinklessError("no images given", fix="pass image files, folders or glob patterns")
    paths = expand_paths([str(i) for i in inputs], IMAGE_SUFFIXES)
    others = [p for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise SinklessError(f"{others[0]} is not an image file", fix=f"pass image files ({', '.join(IMAGE_SUFFIXES)})")
    return [(p.stem, load_image(p)) for p in paths]


def _target_path(folder: Path, index: int, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    return folder / f"{index:05d}_{safe}.safetensors"


def _stage1_targets(loaded, images, folder: Path, settings: Stage1Settings, progress: bool,
                    view_pairs: int = 0, target: str = "clean") -> tuple[torch.Tensor, torch.Tensor, list[float], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(N, h, w, D) raw features and ``target`` features of every image, fitted now or read back from ``folder``,
    and per image ``view_pairs`` crops' (raw, target) features ((K, h, w, D) each, float16). The files keep raw,
    F ("clean") and G ("artifact"), so either target is made from the same fits."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "settings.json"
    wanted = {"model": loaded.name, "stage1_settings": settings.to_dict(), "view_pairs": view_pairs, "images": [n for n, _ in images]}
    if manifest.exists():
        import json

        try:
            stored = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SinklessError(f"cannot read {manifest} ({error})", fix=f"delete the folder {folder} (Stage 1 is fitted again) "
                                "or use a new --out folder") from None
        stored = stored if isinstance(stored, dict) else {}
        if "images" not in stored:  # written before the image list was kept
            wanted.pop("images")
        if stored != json.loads(json.dumps(wanted)):
            what = "other images" if stored.get("images", wanted.get("images")) != wanted.get("images") else "another model or other Stage-1 settings"
            raise SinklessError(f"the Stage-1 targets in {folder} were made with {what}",
                                fix="resume with the same command line (and images) as the first run, or use a new --out folder")
    else:
        atomic_write_json(manifest, wanted)
    if target == "raw-minus-artifact":  # before any fitting: every stored fit must hold G
        from safetensors import safe_open

        for i, (name, _) in enumerate(images):
            path = _target_path(folder, i, name)
            if path.exists():
                with safe_open(str(path), "pt") as handle:
                    if "artifact" not in handle.keys():
                        raise SinklessError(f"{path} holds no fitted artifact G (written by an older sinkless)",
                                            fix="train with --target clean, or use a new --out folder (Stage 1 is fitted again)")
    raws, cleans, seconds, pairs = [], [], [], []
    for i, (name, image) in enumerate(tqdm(images, desc="stage 1 targets", disable=not progress)):
        path = _target_path(folder, i, name)
        if path.exists():
            try:
                tensors = load_file(str(path))
            except Exception as error:  # a truncated or foreign file (safetensors raises its own error type)
                raise SinklessError(f"cannot read the Stage-1 fit {path} ({error})",
                                    fix="delete it and run the same command with --resume: that image is fitted again") from None
        else:
            result = denoise_image(loaded, image, settings, view_pairs=view_pairs)
            tensors = {"raw": result.raw.contiguous(), "clean": result.clean.contiguous(), "artifact": result.artifact.contiguous()}
            if view_pairs:
                tensors |= {"view_raw": result.view_raw.half().contiguous(), "view_clean": result.view_clean.half().contiguous()}
            with atomic_path(path, suffix=".safetensors") as tmp:
                save_file(tensors, str(tmp), metadata={"image": name, "seconds": f"{result.timings['total_s']:.3f}"})
            seconds.append(result.timings["total_s"])
        if target == "raw-minus-artifact":
            tensors["clean"] = tensors["raw"] - tensors["artifact"]  # (h, w, D)
            if view_pairs:  # every crop is a model input on the same grid: the same G at its positions
                tensors["view_clean"] = (tensors["view_raw"].float() - tensors["artifact"]).half()
        raws.append(tensors["raw"])
        cleans.append(tensors["clean"])
        if view_pairs:
            pairs.append((tensors["view_raw"], tensors["view_clean"]))
    shapes = {tuple(t.shape) for t in raws}
    if len(shapes) != 1:
        raise SinklessError(f"stage-1 targets of different shapes {sorted(shapes)} in {folder}", fix="use a new --out folder")
    return torch.stack(raws), torch.stack(cleans), seconds, pairs


def train_denoiser(
    loaded,
    images: list[tuple[str, object]],
    out: str | os.PathLike,
    settings: DenoiserSettings = DenoiserSettings(),
    stage1: Stage1Settings = Stage1Settings(),
    *,
    resume: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict:
    """Stage 1 on ``images`` (``(name, PIL image)`` pairs), then the Stage-2 block; returns the log (also in ``out``).
    ``loaded``: a ``Loaded``, a model object or a zoo name / hub id / folder."""
    from sinkless.zoo import loaded_from

    loaded = loaded_from(loaded)
    check_model(loaded)
    out = check_writable(out)
    if not images:
        raise SinklessError("no images to train the denoiser on", fix="pass --images DIR with image files")
    if settings.holdout >= len(images):
        raise SinklessError(f"--holdout {settings.holdout} leaves no training image out of {len(images)}",
                            fix=f"pass --holdout below {len(images)} (the number of images), or add images")
    if out.is_dir() and any(out.iterdir()):
        earlier = any((out / name).exists() for name in (TARGETS, LOG, "checkpoint.pt", WEIGHTS, CONFIG))
        if not earlier:
            raise SinklessError(f"--out {out} is not empty and holds no denoiser run" + (" to resume" if resume else ""),
                                fix="choose a new or empty folder: the denoiser's files would mix with what is there")
        if not resume:
            raise SinklessError(f"{out} already holds files of an earlier run", fix="pass --resume to continue it, or choose a new --out folder")
    from sinkless.denoise.hook import feature_site

    feature_site(loaded, stage1.features, stage1.layer)  # a denoiser that could not be applied is refused before any work
    if settings.view_pairs > stage1.views:
        log.warning("--view-pairs %d is more than the %d crops Stage 1 takes of an image: %d per image are used",
                    settings.view_pairs, stage1.views, stage1.views)
    device = resolve_device(device)
    loaded.model.to(device)
    started = time.perf_counter()
    raw, clean, seconds, pairs = _stage1_targets(loaded, images, out / TARGETS, stage1, progress, settings.view_pairs, settings.target)
    stage1_done = time.perf_counter()
    n_train = len(images) - settings.holdout
    raw, clean = raw.to(device), clean.to(device)  # (N, h, w, D)
    # training pairs: every training image's whole view and, with view pairs, its crops' pairs; with pairs all are
    # stored in float16 (the crops come so from stage1/) and widened to float32 per batch
    train_raw = torch.cat([raw[:n_train].half(), *(r.to(device) for r, _ in pairs[:n_train])]) if pairs else raw[:n_train]
    train_clean = torch.cat([clean[:n_train].half(), *(c.to(device) for _, c in pairs[:n_train])]) if pairs else clean[:n_train]
    config = DenoiserConfig(dim=raw.shape[-1], grid=tuple(raw.shape[1:3]), features=stage1.features, layer=stage1.layer, model=loaded.name,
                            target=settings.target)
    torch.manual_seed(settings.seed)
    denoiser = Denoiser(config, init=settings.init).to(device)

    def step(t: int, generator: torch.Generator) -> dict:
        index = torch.randint(len(train_raw), (settings.batch,), generator=generator).to(device)  # (B,)
        pred = denoiser(train_raw[index].float())  # (B, h, w, D)
        return {"loss": denoising_loss(pred, train_clean[index].float())}  # the loop detaches what it logs

    train_settings = TrainSettings(
        steps=settings.steps, lr=settings.lr, final_lr=settings.final_lr, schedule="cosine", warmup=int(settings.warmup * settings.steps),
        weight_decay=settings.weight_decay, betas=(0.9, 0.999), seed=settings.seed, checkpoint_every=settings.checkpoint_every,
    )
    meta = {
        "job": "dvt-stage2", "model": loaded.name, "n_images": len(images), "n_train": n_train, "n_pairs": len(train_raw), "images": [n for n, _ in images],
        "denoiser": config.to_dict(), "denoiser_settings": settings.to_dict(), "stage1_settings": stage1.to_dict(),
    }
    meta["job_key"] = _job_key(meta, settings)
    held_raw, held_clean = raw[n_train:], clean[n_train:]
    best = _BestState(dict(denoiser.named_parameters()))

    def score(t: int, row: dict) -> dict | None:
        if not settings.holdout:
            return None
        denoiser.eval()
        cosine = _holdout(denoiser, held_raw, held_clean)["cosine_denoised_to_stage1"]
        denoiser.train()
        best.offer(t, cosine)
        return {"holdout_cosine": cosine}

    result = train(dict(denoiser.named_parameters()), step, train_settings, out, meta=meta, resume=resume, progress=progress, desc="stage 2",
                   on_log=score, extra_state={"best": best} if settings.holdout else None)
    if settings.select == "best":
        best.restore()
    denoiser.eval()
    summary = result.to_dict()
    summary["holdout"] = _holdout(denoiser, held_raw, held_clean) if settings.holdout else None  # of the kept block
    if settings.select == "best":
        summary["selected"] = {"rule": "best", "step": best.step, "holdout_cosine": best.score}
    else:
        kept = summary["holdout"]["cosine_denoised_to_stage1"] if settings.holdout else None
        summary["selected"] = {"rule": settings.select, "step": result.steps_done, "holdout_cosine": kept}
    summary["stage1_timing"] = {"images_fitted_now": len(seconds), "seconds_per_image": sum(seconds) / len(seconds) if seconds else None,
                                "total_s": stage1_done - started}
    summary["total_s"] = time.perf_counter() - started
    summary["sinkless_version"] = __version__
    save_denoiser(denoiser, out, extra={"trained_on": meta["images"][:n_train], "steps": settings.steps, "selected_step": summary["selected"]["step"]})
    atomic_write_json(out / LOG, summary)
    log.info("denoiser written to %s (%s, %s)", out, WEIGHTS, CONFIG)
    return summary


def _job_key(meta: dict, settings: DenoiserSettings) -> dict:
    """What a checkpoint must match to be resumed: the data, model and training settings, less the step budget and
    the choice of the kept step (neither changes a step), and less a default target (so checkpoints written before
    targets were a setting still resume)."""

    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if not (k == "target" and v == "clean")}

    fixed = {k: v for k, v in meta.items() if k not in ("denoiser_settings", "denoiser")}
    return fixed | {"denoiser": keep(meta["denoiser"]),
                    "settings": keep({k: v for k, v in settings.to_dict().items() if k not in ("steps", "checkpoint_every", "select")})}


class _BestState:
    """The parameters at the best held-out score so far; checkpointed with the run, so ``--resume`` picks the same step."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params
        self.step: int | None = None
        self.score = -math.inf
        self.saved: dict[str, torch.Tensor] = {}

    def offer(self, step: int, score: float) -> None:
        if score > self.score:  # the earliest of equal scores stays
            self.step, self.score = step, score
            self.saved = {name: p.detach().cpu().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.saved[name].to(p))

    def state_dict(self) -> dict:
        return {"step": self.step, "score": self.score, "saved": self.saved}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.score, self.saved = state["step"], state["score"], state["saved"]


@torch.no_grad()
def _holdout(denoiser: Denoiser, raw: torch.Tensor, clean: torch.Tensor) -> dict:
    """How close the denoiser's output and the raw features are to the Stage-1 targets of held-out images."""
    pred = denoiser(raw)
    return {
        "n_images": int(raw.shape[0]),
        "cosine_raw_to_stage1": float(F.cosine_similarity(raw, clean, dim=-1).mean()),
        "cosine_denoised_to_stage1": float(F.cosine_similarity(pred, clean, dim=-1).mean()),
        "loss_raw": float(denoising_loss(raw, clean)),
        "loss_denoised": float(denoising_loss(pred, clean)),
    }
