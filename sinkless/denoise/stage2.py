"""DVT Stage 2 (Yang et al. 2024): a generalizable denoiser, one transformer block on top of a frozen ViT.

The block (pre-norm attention + GELU MLP, qkv bias, LayerNorm eps 1e-6, no LayerScale: timm's
``Block`` as DVT configures it) reads the ViT's patch features plus a learned absolute position
embedding, and is trained to output the Stage-1 clean features of the same image (loss MSE + 1 - cos).
Because the position embedding is learned on the model's patch grid, the block can subtract the
position-tied artifact of any image in one forward pass. Other grids resample the embedding
bicubically (timm's ``resample_abs_pos_embed``). No final norm after the block (as in DVT).

Initialisation: ``identity`` (default) zeroes the position embedding and the last layer of both residual
branches, so the untrained block returns its input exactly and training adds only the change the targets
ask for; DVT's own ``dvt`` (timm's truncated normal 0.02 everywhere, position embedding randn · 0.02)
starts from a random perturbation that a CPU-sized training set has to learn away first (docs/RESULTS.md).

Saved as ``denoiser.safetensors`` (weights; the config in its metadata) plus ``config.json``.
Training (``train_denoiser``) lives in ``sinkless.denoise.train``; applying it to a model is a hook
(``sinkless.denoise.hook``).

Shapes: B images, h x w patch grid, P = h·w, D width, H heads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sinkless._io import atomic_path, atomic_write_json
from sinkless._version import __version__
from sinkless.errors import SinklessError

__all__ = ["DenoiserConfig", "Denoiser", "save_denoiser", "load_denoiser", "WEIGHTS", "CONFIG", "INITS"]

WEIGHTS = "denoiser.safetensors"
CONFIG = "config.json"
INITS = ("identity", "dvt")


def check_init(init: str) -> None:
    """A clear error for an ``init`` that is not one of ``INITS``."""
    if init not in INITS:
        raise SinklessError(f"unknown denoiser init {init!r}", fix=f"choose one of {', '.join(INITS)}")


@dataclass(frozen=True)
class DenoiserConfig:
    """Shape of the denoiser and which features of which model it reads."""

    dim: int
    grid: tuple[int, int]  # the patch grid its position embedding was learned on
    heads: int = 0  # 0: dim // 64 (DVT), at least 1
    mlp_ratio: float = 4.0
    features: str = "output"  # see sinkless.denoise.views.FEATURES
    layer: int = -1
    model: str = ""  # the model it was trained for (a zoo name, hub id or folder)
    target: str = "clean"  # what it learned to output: Stage 1's clean field F, or raw-minus-artifact (the features - G)

    @property
    def n_heads(self) -> int:
        heads = self.heads or max(self.dim // 64, 1)
        while self.dim % heads:
            heads -= 1
        return heads

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, data: dict) -> DenoiserConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["grid"] = tuple(values["grid"])
        return cls(**values)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, P, d/H) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, P, d/H)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Denoiser(nn.Module):
    """``forward(features (B, h, w, D)) -> denoised (B, h, w, D)``: + position embedding, one transformer block."""

    def __init__(self, config: DenoiserConfig, *, init: str = "identity") -> None:
        super().__init__()
        check_init(init)
        self.config = config
        dim, hidden = config.dim, int(config.dim * config.mlp_ratio)
        self.pos_embed = nn.Parameter(torch.randn(1, config.grid[0] * config.grid[1], dim) * 0.02)  # (1, P, D)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, config.n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):  # timm's ViT initialisation
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if init == "identity":  # the block starts as the identity: it learns only the change the targets ask for
            nn.init.zeros_(self.pos_embed)
            nn.init.zeros_(self.attn.proj.weight)
            nn.init.zeros_(self.mlp[2].weight)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, h·w, D) the learned embedding, resampled bicubically to ``grid`` when it differs."""
        if tuple(grid) == tuple(self.config.grid):
            return self.pos_embed
        table = self.pos_embed.reshape(1, *self.config.grid, -1).permute(0, 3, 1, 2)  # (1, D, h0, w0)
        smaller = grid[0] < self.config.grid[0] or grid[1] < self.config.grid[1]
        resized = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False, antialias=smaller)
        return resized.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, h, w, d = features.shape
        x = features.reshape(b, h * w, d) + self.position_embedding((h, w)).to(features.dtype)  # (B, P, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.reshape(b, h, w, d)


def save_denoiser(denoiser: Denoiser, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``denoiser.safetensors`` (config in its metadata) and ``config.json`` into the folder ``out``, atomically."""
    from safetensors.torch import save_file

    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    config = {**denoiser.config.to_dict(), "sinkless_version": __version__, **(extra or {})}
    tensors = {name: p.detach().cpu().contiguous() for name, p in denoiser.state_dict().items()}
    with atomic_path(folder / WEIGHTS, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"sinkless_denoiser": json.dumps(config)})
    atomic_write_json(folder / CONFIG, config)
    return folder / WEIGHTS


def load_denoiser(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Denoiser:
    """A saved denoiser from its folder (or its ``.safetensors`` file); clear errors for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise SinklessError(
            f"no denoiser at {path} (expected {WEIGHTS} in that folder)",
            fix="train one with `sinkless denoise --train-denoiser --model NAME --images DIR --out DIR`",
        )
    try:
        with safe_open(str(weights), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["sinkless_denoiser"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        config = DenoiserConfig.from_dict(meta)
    except (SafetensorError, KeyError, ValueError, TypeError, OSError) as error:
        raise SinklessError(
            f"{weights} is not a sinkless denoiser ({type(error).__name__})",
            fix="pass the --out folder of `sinkless denoise --train-denoiser`",
        ) from None
    denoiser = Denoiser(config)
    try:
        denoiser.load_state_dict(tensors)
    except RuntimeError as error:
        raise SinklessError(f"{weights} does not match its own config ({str(error).splitlines()[0]})", fix="retrain the denoiser") from None
    denoiser.meta = meta  # type: ignore[attr-defined]
    return denoiser.to(device).eval()
