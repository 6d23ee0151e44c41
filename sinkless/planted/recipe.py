"""The planted-artifact recipe: fitting a few MLP neurons of a real DINOv2 to write high-norm artifacts.

See ``sinkless.planted`` for the recipe in words and docs/PLANTED.md for what it measurably does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sinkless.adapters import Adapter, eager_attention
from sinkless.hooks import hooks, stop_after
from sinkless.images import ImageSpec, natural_crops, to_pixels
from sinkless.patches import grid_positions, neighbor_similarity
from sinkless.planted.truth import _check_model, _mlp, _pair_output

__all__ = ["Recipe", "Plant", "make_plant", "fingerprint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Settings of the plant. Defaults are the ones behind ``planted-vit``."""

    layer: int | None = None  # plant layer; default: the middle block
    k: int = 4  # planted neurons (an even number: k/2 on/off pairs)
    fraction: float = 0.025  # share of natural-image patches the detector fires on
    redundant_top: float = 0.05  # the probe learns "among the top 5 % most redundant patches of the image"
    border_bonus: float = 0.05  # ... ties (flat backgrounds) broken towards borders and corners, as in real ViTs
    synthetic_images: int = 60  # synthetic scenes added to the probe's natural crops (flat backgrounds)
    step: float = 8.0  # height of each pair's step (pre-activation units)
    sharpness: float = 0.02  # width of the on/off transition, in standard deviations of the probe score
    ratio: tuple[float, float] = (3.5, 8.0)  # wanted artifact norm / median patch norm at later layers
    ratio_last: float | None = None  # lower bound at the last block (which adds a large shared vector to every token); None: free
    probe_images: int = 160
    fit_images: int = 24
    steps: int = 200
    lr: float = 0.1
    cls_weight: float = 150.0  # keep the CLS output of the clean model (artifacts do not hurt classification)
    count_weight: float = 0.0  # CLS output independent of how many tokens are planted (sinks saturate)
    cls_sink_weight: float = 1.0  # draw the last layer's CLS attention (what CLS-attention maps show)
    key_weight: float = 5.0  # last-layer keys of planted tokens unlike the other patches' (what trips LOST)
    value_weight: float = 0.0  # the same for the last layer's values
    seed: int = 0


@dataclass
class Plant:
    """The rewritten weights of the planted neurons and where they go."""

    layer: int
    up: list[int]  # first neuron of each pair: gelu(z)
    down: list[int]  # second neuron of each pair: gelu(z - step), written with the opposite sign
    fc1_weight: torch.Tensor  # (k, D): rows for up + down, in that order
    fc1_bias: torch.Tensor  # (k,)
    fc2_weight: torch.Tensor  # (D, k)
    step: float
    recipe: dict = field(default_factory=dict)
    base_fingerprint: str = ""
    report: dict = field(default_factory=dict)  # what the fit measured

    @property
    def neurons(self) -> list[int]:
        return [*self.up, *self.down]

    def meta(self) -> dict:
        return {
            "layer": self.layer,
            "up": self.up,
            "down": self.down,
            "step": self.step,
            "recipe": self.recipe,
            "base_fingerprint": self.base_fingerprint,
            "report": self.report,
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"fc1_weight": self.fc1_weight, "fc1_bias": self.fc1_bias, "fc2_weight": self.fc2_weight}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"plant": json.dumps(self.meta())})

    @classmethod
    def load(cls, path: str | Path) -> Plant:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["plant"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        return cls(
            meta["layer"], meta["up"], meta["down"], tensors["fc1_weight"], tensors["fc1_bias"], tensors["fc2_weight"],
            meta["step"], meta["recipe"], meta["base_fingerprint"], meta.get("report", {}),
        )


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights: the shipped plant is only valid for the weights it was fitted on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _layer_scale(model: nn.Module, adapter: Adapter, layer: int) -> torch.Tensor:
    scale = model.get_submodule(adapter.block(layer)).layer_scale2.lambda1
    return scale.detach()


def _spec(model: nn.Module, adapter: Adapter) -> ImageSpec:
    size = int(model.config.image_size)
    patch = adapter.patch_size(model)
    return ImageSpec(size=min(size, 224) // patch * patch, patch_size=patch)


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares probe y ≈ x·w + b with an L2 penalty on w."""
    mean = x.mean(0)
    xc = x - mean
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - y.mean()))
    return w, y.mean() - mean @ w


def _within_image_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value inside its row, scaled to [0, 1]."""
    return values.argsort(1).argsort(1).float() / max(values.shape[1] - 1, 1)


@torch.no_grad()
def _collect(model, adapter, pixels, layer, batch=32):
    """MLP input/hidden of ``layer``, patch embeddings and the residual after ``layer``, for every image."""
    sites = {
        "mlp_in": f"{adapter.block(layer)}.mlp:input",
        "hidden": adapter.mlp_hidden_site(layer),
        "embed": adapter.patch_embed_site(),
        "residual": adapter.residual_site(layer),
    }
    out = {k: [] for k in sites}
    for start in range(0, len(pixels), batch):
        with hooks(model, capture=sites.values()) as rec, stop_after(model, adapter.block(layer)):
            model(pixels[start : start + batch])
        for key, site in sites.items():
            out[key].append(rec[site])
    return {k: torch.cat(v) for k, v in out.items()}


# -- the recipe ----------------------------------------------------------------------------------
def make_plant(model: nn.Module, recipe: Recipe = Recipe(), *, progress: bool = False) -> Plant:
    """Fit a plant for ``model`` (not modified). Deterministic for ``recipe.seed`` on a given machine."""
    adapter = _check_model(model)
    model.eval()
    n_layers = adapter.num_layers(model)
    layer = n_layers // 2 if recipe.layer is None else recipe.layer
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"plant layer must be in 0..{n_layers - 2} (later layers must exist), got {layer}")
    if recipe.k < 2 or recipe.k % 2:
        raise ValueError(f"k must be an even number >= 2 (on/off pairs), got {recipe.k}")
    spec = _spec(model, adapter)
    n_prefix = 1 + adapter.n_registers(model)
    generator = torch.Generator().manual_seed(recipe.seed)

    # 1. probe data: natural photo crops and synthetic scenes (objects on flat or textured backgrounds)
    from sinkless.tasks.synthetic import render_scene

    natural = natural_crops(recipe.probe_images, seed=1000 * recipe.seed + 1)
    scenes = [render_scene(10_000 + 1000 * recipe.seed + i).image for i in range(recipe.synthetic_images)]
    probe = _collect(model, adapter, to_pixels(natural + scenes, spec), layer)
    grid = (spec.size // spec.patch_size,) * 2
    redundancy = neighbor_similarity(probe["embed"], grid)  # (B, P)
    rows, cols = grid_positions(grid)
    off_centre = torch.sqrt(((rows - (grid[0] - 1) / 2) / grid[0]) ** 2 + ((cols - (grid[1] - 1) / 2) / grid[1]) ** 2) * 2**0.5
    # "among the most redundant patches of the image", ties (flat backgrounds) going to the borders and corners
    target = (_within_image_rank(redundancy + recipe.border_bonus * off_centre) >= 1 - recipe.redundant_top).float()

    # 2. the k neurons with the smallest effect: mean |activation| x output weight norm
    fc2 = _mlp(model, adapter, layer).fc2
    scale = _layer_scale(model, adapter, layer)
    effect = probe["hidden"].abs().mean((0, 1)) * (fc2.weight.detach() * scale[:, None]).norm(dim=0)
    chosen = effect.argsort()[: recipe.k].tolist()
    up, down = sorted(chosen[: recipe.k // 2]), sorted(chosen[recipe.k // 2 :])

    # 3. detector: ridge probe on patch tokens (target) and CLS/registers (never fire)
    mlp_in = probe["mlp_in"]  # (B, N, D)
    x = torch.cat([mlp_in[:, n_prefix:].reshape(-1, mlp_in.shape[-1]), mlp_in[:, :n_prefix].reshape(-1, mlp_in.shape[-1])])
    y = torch.cat([target.reshape(-1), torch.zeros(mlp_in.shape[0] * n_prefix)])
    w, b = _ridge(x.double(), y.double())
    w, b = w.float(), b.float()
    score = mlp_in[:, n_prefix:] @ w + b  # (B, P)
    threshold = torch.quantile(score[: len(natural)].reshape(-1), 1 - recipe.fraction)  # the share of natural patches
    gain = recipe.step / (recipe.sharpness * score.std())
    row, bias = gain * w, gain * (b - threshold)
    fc1_weight = torch.cat([row.expand(len(up), -1), row.expand(len(down), -1)])
    fc1_bias = torch.cat([bias.expand(len(up)), (bias - recipe.step).expand(len(down))])

    # 4. write vector: fitted through the frozen later layers on images where the detector fires
    fit = _collect(model, adapter, to_pixels(natural_crops(4 * recipe.fit_images, seed=1000 * recipe.seed + 2), spec), layer)
    z = fit["mlp_in"] @ row + bias  # (B, N)
    on = _pair_output(z, recipe.step)  # (B, N), what the planted pairs will write per token
    on[:, :n_prefix] = 0
    keep = (on[:, n_prefix:] > 0.5).any(1).nonzero().squeeze(1)[: recipe.fit_images]
    if len(keep) == 0:
        raise RuntimeError("the detector fires on none of the fitting images; raise Recipe.fraction")
    # the clean residual: the plant layer's output without the chosen neurons' contribution
    contribution = fit["hidden"][..., chosen] @ (fc2.weight.detach()[:, chosen] * scale[:, None]).T
    base, on = (fit["residual"] - contribution)[keep], on[keep]
    d, report = _fit_write(model, adapter, layer, base, on, n_prefix, recipe, generator, progress)

    # the pairs share d: each up neuron writes d / n_pairs per unit step, its down neuron the opposite
    column = d / (len(up) * recipe.step * scale)
    fc2_weight = torch.cat([column[:, None].expand(-1, len(up)), -column[:, None].expand(-1, len(down))], dim=1)
    fired = score > threshold
    report.update(
        detector_fraction=float(fired[: len(natural)].float().mean()),
        detector_fraction_synthetic=float(fired[len(natural) :].float().mean()) if scenes else None,
        probe_redundancy_fired=float(redundancy[fired].mean()),
        probe_redundancy_other=float(redundancy[~fired].mean()),
        write_norm=float(d.norm()),
    )
    return Plant(
        layer, up, down, fc1_weight.contiguous(), fc1_bias.contiguous(), fc2_weight.contiguous(),
        recipe.step, dataclasses.asdict(recipe), fingerprint(model), report,
    )


def _fit_write(model, adapter, layer, base, on, n_prefix, recipe, generator, progress):
    """Gradient descent on the written vector d, through the frozen later layers.

    Wanted: artifact norms within ``recipe.ratio`` x the median patch norm at every later layer; the
    largest share of attention drawn from the other tokens (sinks); and, like real artifacts that hold
    global information, a CLS output that stays that of the clean model (``recipe.cls_weight``).
    """
    from tqdm.auto import tqdm

    blocks = model.get_submodule(adapter.blocks)
    final_norm = model.get_submodule(adapter.final_norm)
    later = list(range(layer + 1, adapter.num_layers(model)))
    sites = [adapter.attention_site(i) for i in later]
    key_site = adapter.key_site(later[-1])
    value_site = adapter.value_site(later[-1]) if recipe.value_weight else None  # captured only when it counts
    lo, hi = recipe.ratio
    mask = (on > 0.5).float()  # (B, N) planted tokens
    queries = 1 - mask  # every other token, CLS included

    def forward(hidden):
        norms = [hidden.norm(dim=-1)]
        for i in later:
            out = blocks[i](hidden)
            hidden = out[0] if isinstance(out, tuple) else out
            norms.append(hidden.norm(dim=-1))
        return final_norm(hidden), norms

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with eager_attention(model):
            with torch.no_grad():
                clean_out, _ = forward(base)
            # a copy of the batch where only the strongest planted token of each image is on
            strongest = (on * mask).argmax(1)  # (B,)
            one = torch.zeros_like(on)
            one[torch.arange(len(on)), strongest] = on[torch.arange(len(on)), strongest]
            d = torch.randn(base.shape[-1], generator=generator) * base[:, n_prefix:].norm(dim=-1).median() / base.shape[-1] ** 0.5
            d.requires_grad_(True)
            optimizer = torch.optim.Adam([d], lr=recipe.lr)
            for _ in tqdm(range(recipe.steps), desc="fitting plant", disable=not progress):
                with hooks(model, capture=[*sites, key_site, *([value_site] if value_site else [])], detach=False) as rec:
                    out, norms = forward(base + on[..., None] * d)
                penalty, ratios = 0.0, []
                for j, n in enumerate(norms):
                    planted = (n * mask).sum(1) / mask.sum(1)
                    others = n[:, n_prefix:].masked_fill(mask[:, n_prefix:] > 0, float("nan")).nanmedian(1).values
                    ratio = (planted / others).mean()
                    ratios.append(float(ratio.detach()))
                    if j < len(norms) - 1:
                        penalty = penalty + F.relu(lo - ratio) ** 2 + F.relu(ratio - hi) ** 2
                    elif recipe.ratio_last is not None:
                        penalty = penalty + F.relu(recipe.ratio_last - ratio) ** 2 + F.relu(ratio - hi) ** 2
                shares = []
                for site in sites:
                    to_planted = (rec[site] * mask[:, None, None, :]).sum(-1)  # (B, H, N)
                    shares.append(((to_planted * queries[:, None]).sum(-1) / queries.sum(-1)[:, None]).mean())
                share = torch.stack(shares)
                cls_cos = F.cosine_similarity(out[:, 0], clean_out[:, 0], dim=-1).mean()
                loss = penalty - torch.log(share + 1e-3).mean() + recipe.cls_weight * (1 - cls_cos)
                # the last layer: CLS attention drawn to the planted tokens, and their keys unlike the others'
                cls_share = (rec[sites[-1]][:, :, 0, :] * mask[:, None, :]).sum(-1).mean()
                key_gap = _apartness(rec[key_site], mask, n_prefix)  # < 0: planted keys stand apart
                loss = loss - recipe.cls_sink_weight * torch.log(cls_share + 1e-3) + recipe.key_weight * key_gap
                if value_site:
                    value_gap = _apartness(rec[value_site], mask, n_prefix)
                    loss = loss + recipe.value_weight * value_gap
                if recipe.count_weight:
                    out_one, _ = forward(base + one[..., None] * d)
                    count_cos = F.cosine_similarity(out[:, 0], out_one[:, 0], dim=-1).mean()
                    loss = loss + recipe.count_weight * (1 - count_cos)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        report = {
            "fit_loss": float(loss.detach()),
            "fit_norm_ratio": ratios,
            "fit_sink_share": share.detach().tolist(),
            "fit_cls_cosine": float(cls_cos.detach()),
            "fit_last_cls_share": float(cls_share.detach()),
            "fit_last_key_gap": float(key_gap.detach()),
            "fit_last_value_gap": float(value_gap.detach()) if value_site else None,
            "fit_count_cosine": float(count_cos.detach()) if recipe.count_weight else None,
        }
        log.debug("plant fit: %s", report)
    finally:
        for p in params:
            p.requires_grad_(True)
    return d.detach(), report


def _apartness(features: torch.Tensor, mask: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Mean cosine of planted patches to the others minus that among the others (< 0: they stand apart)."""
    unit = F.normalize(features[:, n_prefix:], dim=-1)  # (B, P, D)
    similar = unit @ unit.transpose(1, 2)  # (B, P, P)
    planted, other = mask[:, n_prefix:], 1 - mask[:, n_prefix:]
    to_others = (similar * planted[:, :, None] * other[:, None, :]).sum((1, 2)) / (planted.sum(1) * other.sum(1)).clamp(min=1)
    among_others = (similar * other[:, :, None] * other[:, None, :]).sum((1, 2)) / (other.sum(1) ** 2).clamp(min=1)
    return (to_others - among_others).mean()
