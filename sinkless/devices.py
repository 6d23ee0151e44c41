"""Where a model runs and in which precision: ``--device`` / ``--dtype`` for every command.

``resolve_device("auto")`` picks CUDA, then Apple's MPS, then the CPU; an explicit choice that this
machine cannot honour is a ``SinklessError`` naming what is missing. ``resolve_dtype`` maps the CLI's
names to torch dtypes. ``autocast`` is the mixed-precision context training loops use (bf16 on CUDA,
a no-op elsewhere unless asked for on the CPU too). ``resolve_amp`` turns an ``--amp auto|bf16|off`` choice
into that switch: ``auto`` computes in bf16 where the hardware multiplies bf16 matrices natively (CUDA GPUs
that support it; CPUs with AMX or AVX512-BF16, where a ViT forward runs ~3x faster than in float32) and in
float32 elsewhere, where emulated bf16 would be slower.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from sinkless.errors import SinklessError

__all__ = ["DEVICES", "DTYPES", "AMP", "resolve_device", "resolve_dtype", "resolve_amp", "native_bf16", "add_device_args", "autocast", "model_device"]

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AMP = ("auto", "bf16", "off")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; ``cuda:1`` etc. are accepted as given."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise SinklessError(f"unknown device {name!r}", fix=f"choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SinklessError(
            f"--device {name}: this PyTorch build ({torch.__version__}) sees no CUDA GPU",
            fix="use --device cpu (or auto), or install a CUDA build of PyTorch on a machine with a GPU",
        )
    if kind == "cuda" and ":" in name:
        index = name.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise SinklessError(f"--device {name}: no such GPU ({torch.cuda.device_count()} visible)", fix="use cuda:0 .. cuda:N-1")
    if kind == "mps" and not _mps_available():
        raise SinklessError(f"--device {name}: Apple's MPS backend is not available here", fix="use --device cpu (or auto)")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype | None = "float32") -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (also ``fp32``, ``bf16``, ``fp16``) -> a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get((name or "float32").strip().lower(), (name or "float32").strip().lower())
    if key not in DTYPES:
        raise SinklessError(f"unknown dtype {name!r}", fix=f"choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def add_device_args(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """Add ``--device`` (and ``--dtype``) to a command's parser."""
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,mps}",
                        help="where the model runs: auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                            help="weights and activations precision (default float32; bfloat16 halves memory)")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports bf16, or a CPU
    with AMX tiles or AVX512-BF16 (emulated bf16 elsewhere is slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = (getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None))
        return any(bool(check()) for check in checks if check is not None)
    return False


def resolve_amp(amp: str | bool | None, device: torch.device | str) -> bool:
    """``auto`` (default) / ``bf16`` / ``off`` (also True / False) -> whether to compute in bf16 autocast on ``device``."""
    if isinstance(amp, bool):
        return amp
    choice = (amp or "auto").strip().lower()
    if choice not in AMP:
        raise SinklessError(f"unknown --amp {amp!r}", fix=f"choose one of {', '.join(AMP)}")
    device = torch.device(device)
    if choice == "off" or device.type not in ("cpu", "cuda"):
        return False
    return choice == "bf16" or native_bf16(device)


def autocast(device: torch.device | str, enabled: bool = True, *, cpu: bool = False):
    """Mixed precision for forwards and training steps: bfloat16 autocast on CUDA (and on the CPU with
    ``cpu=True``), nothing elsewhere."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
