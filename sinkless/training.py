"""The one small training loop behind sinkless's long jobs (distill, the DVT stage-2 denoiser, train-attn).

A job supplies named trainable parameters and a ``step(step, generator) -> {"loss": tensor, ...}``
function; ``train`` does the rest: AdamW with a learning-rate schedule, seeded randomness, a progress
bar with loss and ETA, bf16 autocast on CUDA, a JSON log, and checkpoints every N steps from which
``resume=True`` continues *exactly* (same final weights as an uninterrupted run with the same seed).

Exact resumption rests on one rule: all randomness of step ``t`` comes from the ``generator`` handed
to ``step``, seeded from ``(seed, t)``; the loop restores parameters, optimizer state and the step
counter, so nothing else needs to be replayed (nanoGPT's checkpoints, minus the data-loader state).

Checkpoints are written atomically (a temporary file and a rename), so an interrupted write never
replaces a good checkpoint. Ctrl-C or SIGTERM between steps saves one more checkpoint before exiting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from sinkless._io import atomic_path, atomic_write_json
from sinkless._version import __version__
from sinkless.devices import autocast
from sinkless.errors import SinklessError

__all__ = ["TrainSettings", "TrainResult", "train", "learning_rate", "CHECKPOINT", "LOG"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.json"

StepFn = Callable[[int, torch.Generator], Mapping[str, torch.Tensor | float]]
"""``step(t, generator)``: one training step's losses; ``"loss"`` is the one optimised, others are logged."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser, schedule and bookkeeping of one training run."""

    steps: int = 1000
    lr: float = 1e-4
    final_lr: float | None = None  # end of the schedule (cosine / exponential); None: lr / 10
    schedule: str = "cosine"  # constant | cosine | exponential | linear
    warmup: int = 0  # steps of linear warm-up from 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    amp: bool = True  # bf16 autocast when the device is CUDA
    cpu_amp: bool = False  # ... and on the CPU too (see devices.resolve_amp)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise SinklessError(f"steps must be >= 1, got {self.steps}", fix="pass --steps N with N >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SinklessError(f"learning rate must be a positive number, got {self.lr}")
        if self.schedule not in _SCHEDULES:
            raise SinklessError(f"unknown schedule {self.schedule!r}", fix=f"choose one of {', '.join(_SCHEDULES)}")
        if self.warmup < 0:
            raise SinklessError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise SinklessError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cosine(progress: float, lr: float, final: float) -> float:
    return final + 0.5 * (lr - final) * (1 + math.cos(math.pi * progress))


def _exponential(progress: float, lr: float, final: float) -> float:
    return lr * (final / lr) ** progress


def _linear(progress: float, lr: float, final: float) -> float:
    return lr + (final - lr) * progress


_SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "constant": lambda progress, lr, final: lr,
    "cosine": _cosine,
    "exponential": _exponential,
    "linear": _linear,
}


def learning_rate(settings: TrainSettings, step: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then the schedule to ``final_lr``."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    final = settings.final_lr if settings.final_lr is not None else settings.lr / 10
    span = max(settings.steps - settings.warmup - 1, 1)
    progress = min(max(step - settings.warmup, 0) / span, 1.0)
    return _SCHEDULES[settings.schedule](progress, settings.lr, final)


@dataclass
class TrainResult:
    """What ``train`` did; ``to_dict()`` is the JSON log (``train_log.json``)."""

    settings: dict
    meta: dict
    steps_done: int
    curve: list[dict] = field(default_factory=list)  # [{"step", "loss", "lr", ...}] every log_every steps
    seconds: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    device: str = "cpu"
    finished: bool = False

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1]["loss"] if self.curve else None

    def to_dict(self) -> dict:
        return {
            "sinkless_version": __version__,
            **self.meta,
            "settings": self.settings,
            "steps_done": self.steps_done,
            "finished": self.finished,
            "seconds": round(self.seconds, 3),
            "resumed_from": self.resumed_from,
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "loss_curve": self.curve,
        }


def _job(settings: TrainSettings, names: list[str], meta: dict, scales: dict[str, float]) -> dict:
    """What must match for a checkpoint to be resumed: everything but the step budget (and the warm-up derived from
    it) and bookkeeping."""
    keep = {k: v for k, v in settings.to_dict().items() if k not in ("steps", "warmup", "checkpoint_every", "log_every")}
    job = {"settings": keep, "params": names, "job": meta.get("job_key", meta)}
    if scales:  # absent when unused, so checkpoints written before lr_scale existed still resume
        job["lr_scale"] = scales
    return json.loads(json.dumps(job, sort_keys=True, default=str))


def _fingerprint(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def _differences(before, now, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two job dicts (a checkpoint's and this run's)."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in sorted(set(before) | set(now)) for d in _differences(before.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if before == now else [prefix.rstrip(".")]


def _save(path: Path, params: Mapping[str, torch.Tensor], optimizer, extra: Mapping[str, Stateful], result: TrainResult, job: dict) -> None:
    state = {
        "key": _fingerprint(job),
        "job": job,
        "step": result.steps_done,
        "params": {name: p.detach().cpu().clone() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "extra": {name: obj.state_dict() for name, obj in extra.items()},
        "curve": result.curve,
        "seconds": result.seconds,
        "resumed_from": result.resumed_from,
        "sinkless_version": __version__,
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _load(path: Path, job: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise SinklessError(f"cannot read the checkpoint {path} ({type(error).__name__})",
                            fix=f"delete {path.name} and run the same command with --resume to train from step 0 (the folder's "
                                "other files are kept), or use a new --out folder") from None
    if not isinstance(state, dict) or state.get("key") != _fingerprint(job):
        differ = _differences(state.get("job"), job) if isinstance(state, dict) and isinstance(state.get("job"), dict) else []
        said = f" (differs: {', '.join(d.removeprefix('job.').removeprefix('settings.') for d in differ[:4])})" if differ else ""
        raise SinklessError(
            f"the checkpoint in {path.parent} was made with other settings, data or model{said}",
            fix="resume with the same command line as the first run, or use a new --out folder",
        )
    return state


def train(
    params: Mapping[str, torch.nn.Parameter],
    step: StepFn,
    settings: TrainSettings,
    out_dir: str | os.PathLike,
    *,
    meta: dict | None = None,
    extra_state: Mapping[str, Stateful] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_log: Callable[[int, dict], dict | None] | None = None,
    desc: str = "training",
    lr_scale: Mapping[str, float] | None = None,
) -> TrainResult:
    """Optimise ``params`` with ``step`` for ``settings.steps`` steps; checkpoints and the log go to ``out_dir``.

    ``meta`` is written into the log (model id, data, job settings); its ``"job_key"`` entry, when given,
    is what a checkpoint must match to be resumed (default: all of ``meta``). ``extra_state`` are other
    objects with ``state_dict``/``load_state_dict`` to checkpoint. ``lr_scale`` multiplies the schedule's
    learning rate for the named parameters (e.g. a new per-head sink logit that must move faster than
    the pretrained weights around it). ``on_log(step, row)`` may add entries
    (e.g. an evaluation) to a log row. With ``resume`` a checkpoint in ``out_dir`` is continued; without it
    an existing checkpoint is an error (never overwritten silently).
    """
    out = Path(out_dir)
    meta = dict(meta or {})
    extra = dict(extra_state or {})
    names = sorted(params)
    if not names:
        raise SinklessError("nothing to train: no trainable parameters were given", fix="choose at least one part to train")
    first = params[names[0]]
    device = first.device
    checkpoint = out / CHECKPOINT
    scales = dict(lr_scale or {})
    unknown = sorted(set(scales) - set(names))
    if unknown:
        raise ValueError(f"lr_scale names parameters that are not trained: {unknown}")
    job = _job(settings, names, meta, scales)
    # one group per distinct learning-rate multiplier (a single group when none is given)
    by_scale: dict[float, list[str]] = {}
    for name in names:
        by_scale.setdefault(float(scales.get(name, 1.0)), []).append(name)
    optimizer = torch.optim.AdamW(
        [{"params": [params[n] for n in group], "scale": scale} for scale, group in by_scale.items()],
        lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay,
    )
    result = TrainResult(settings.to_dict(), {k: v for k, v in meta.items() if k != "job_key"}, 0, device=str(device))
    if checkpoint.exists():
        if not resume:
            raise SinklessError(f"{out} already holds a checkpoint of an earlier run", fix="pass --resume to continue it, or choose a new --out folder")
        state = _load(checkpoint, job)
        with torch.no_grad():
            for name in names:
                params[name].copy_(state["params"][name].to(params[name]))
        optimizer.load_state_dict(state["optimizer"])
        for name, obj in extra.items():
            if name in state["extra"]:
                obj.load_state_dict(state["extra"][name])
            else:  # a checkpoint written before this state was kept (an older sinkless)
                log.warning("the checkpoint in %s holds no %r state: it starts afresh from step %d", out, name, int(state["step"]))
        result.steps_done = int(state["step"])
        result.curve = list(state["curve"])
        result.seconds = float(state["seconds"])
        result.resumed_from = [*state.get("resumed_from", []), result.steps_done]
        log.info("resuming from step %d of %d (%s)", result.steps_done, settings.steps, checkpoint)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting from step 0", out)
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint_now() -> None:
        _save(checkpoint, params, optimizer, extra, result, job)
        atomic_write_json(out / LOG, result.to_dict())

    start_step = result.steps_done
    started = time.perf_counter() - result.seconds
    smoothed = None
    in_step = False
    bar = tqdm(total=settings.steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for t in range(start_step, settings.steps):
            in_step = True
            lr = learning_rate(settings, t)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["scale"]
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + t)
            with autocast(device, settings.amp, cpu=settings.cpu_amp):
                losses = step(t, generator)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise SinklessError(
                    f"the loss became {float(loss.detach())} at step {t + 1}",
                    fix="lower the learning rate and train again into a new output folder" + (
                        " (--resume continues only with the same settings; the last good checkpoint stays here)" if checkpoint.exists()
                        else " (no checkpoint was written yet)"),
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_([params[n] for n in names], settings.grad_clip)
            optimizer.step()
            in_step = False
            result.steps_done = t + 1
            result.seconds = time.perf_counter() - started
            value = float(loss.detach())
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4g}", lr=f"{lr:.2e}")
            if (t + 1) % settings.log_every == 0 or t + 1 == settings.steps or t == 0:  # the same rows whether or not the run was resumed
                row = {"step": t + 1, "lr": lr, **{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in losses.items()}}
                if on_log is not None:
                    row.update(on_log(t + 1, row) or {})
                result.curve.append(row)
            if (t + 1) % settings.checkpoint_every == 0 and t + 1 < settings.steps:
                checkpoint_now()
        result.finished = True
        checkpoint_now()
    except KeyboardInterrupt:
        if not in_step and result.steps_done > start_step:
            checkpoint_now()
            log.warning("interrupted at step %d: checkpoint saved, continue with --resume", result.steps_done)
        elif checkpoint.exists():
            log.warning("interrupted during step %d: the last checkpoint stays (continue with --resume)", result.steps_done + 1)
        else:
            log.warning("interrupted during step %d, before the first checkpoint: nothing is kept to resume "
                        "(run the command again)", result.steps_done + 1)
        raise
    finally:
        bar.close()
    return result
