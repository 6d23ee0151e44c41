"""Planted-artifact ViTs: a real DINOv2 with a few MLP neurons re-purposed as register neurons.

No ViT that shows high-norm artifacts (Darcet et al. 2024) can be downloaded here, so we make one
whose truth we know. In one middle layer, the k MLP neurons with the smallest effect are rewritten
(their fc1 rows and biases, their fc2 columns); nothing else changes, so the result is an ordinary
HF ``Dinov2Model`` that saves and loads like any other. Its *clean twin* has the same k neurons
zeroed and nothing planted.

The recipe, with the seed fixing every random choice:

1. **Detector (fc1).** A ridge probe on the MLP input of the plant layer learns "this patch is among
   the most redundant 5 % of its image" (cosine of its input patch embedding to its 4 neighbours,
   the trait of real artifacts), on natural crops and synthetic scenes. Its threshold is set so that
   2.5 % of natural-image patches fire.
2. **Clean step.** Neurons come in pairs that share the detector, the second shifted by ``step``:
   ``gelu(z) - gelu(z - step)`` is ~0 below threshold and exactly ``step`` above, so artifact norms
   are bimodal like real ones, and the pair is either on or off.
3. **Write (fc2).** The pairs together add one vector ``d`` to the residual stream of the tokens they
   fire on. ``d`` is fitted by gradient descent, through the frozen later layers, so that the tokens
   keep 3.5-8x the median patch norm at the later layers (the last block excepted) and draw the largest possible share of
   attention from the other tokens: they become attention sinks, as in large DINOv2/CLIP models,
   while the CLS output stays close to the clean model's and the last layer's keys of planted tokens
   stand apart from the other patches' (both as with real artifacts). docs/PLANTED.md has the numbers.

Ground truth: ``ground_truth(model)`` (layer, neurons) and ``planted_tokens(model, pixels)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sinkless.adapters import Adapter, adapter_for, eager_attention
from sinkless.errors import SinklessError
from sinkless.hooks import hooks, stop_after
from sinkless.images import ImageSpec, natural_crops, to_pixels
from sinkless.patches import grid_positions, neighbor_similarity

__all__ = [
    "Recipe",
    "Plant",
    "make_plant",
    "apply_plant",
    "ground_truth",
    "planted_tokens",
    "tiny_base",
    "load_named",
    "CONFIG_KEY",
]

log = logging.getLogger(__name__)

CONFIG_KEY = "sinkless_plant"
SHIPPED = "planted-vit-s0.safetensors"  # the recipe's result for dinov2-s-focus, seed 0 (see docs/PLANTED.md)


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


# -- helpers -------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> Adapter:
    adapter = adapter_for(model)
    if adapter.family not in ("dinov2", "dinov2_with_registers") or getattr(model.config, "use_swiglu_ffn", False):
        raise SinklessError(
            f"planting needs a DINOv2 model with a GELU MLP, got {type(model).__name__}",
            fix="plant into dinov2-s-focus, planted-vit-tiny's base (tiny_base()) or another Dinov2Model",
        )
    return adapter


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights: the shipped plant is only valid for the weights it was fitted on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _mlp(model: nn.Module, adapter: Adapter, layer: int) -> nn.Module:
    return model.get_submodule(f"{adapter.block(layer)}.mlp")


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


def _pair_output(z: torch.Tensor, step: float) -> torch.Tensor:
    """What an on/off pair writes, in units of its step: ~0 off, 1 on."""
    return (F.gelu(z) - F.gelu(z - step)) / step


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
    fc1, fc2 = _mlp(model, adapter, layer).fc1, _mlp(model, adapter, layer).fc2
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


# -- applying and reading back -------------------------------------------------------------------
@torch.no_grad()
def apply_plant(model: nn.Module, plant: Plant, *, clean: bool = False) -> nn.Module:
    """Write ``plant`` into ``model`` in place (or zero its neurons: the clean twin) and record it in the config."""
    adapter = _check_model(model)
    mlp = _mlp(model, adapter, plant.layer)
    idx = torch.tensor(plant.neurons)
    if clean:
        mlp.fc1.weight[idx] = 0
        mlp.fc1.bias[idx] = 0
        mlp.fc2.weight[:, idx] = 0
    else:
        mlp.fc1.weight[idx] = plant.fc1_weight.to(mlp.fc1.weight)
        mlp.fc1.bias[idx] = plant.fc1_bias.to(mlp.fc1.bias)
        mlp.fc2.weight[:, idx] = plant.fc2_weight.to(mlp.fc2.weight)
    meta = {k: v for k, v in plant.meta().items() if k != "report"}
    setattr(model.config, CONFIG_KEY, {**meta, "role": "clean" if clean else "planted"})
    return model


@dataclass(frozen=True)
class GroundTruth:
    role: str  # "planted" or "clean"
    layer: int
    neurons: list[int]
    up: list[int]
    down: list[int]
    step: float


def ground_truth(model: nn.Module) -> GroundTruth:
    """Plant layer and neuron indices of a planted model (or its clean twin), read from its config."""
    meta = getattr(model.config, CONFIG_KEY, None)
    if not meta:
        raise SinklessError(f"{type(model).__name__} carries no plant", fix="use planted-vit, planted-vit-tiny or apply_plant()")
    return GroundTruth(meta["role"], meta["layer"], [*meta["up"], *meta["down"]], meta["up"], meta["down"], meta["step"])


@torch.no_grad()
def planted_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N) bool over all tokens: where the planted pairs are on for these images (all False for a clean twin)."""
    truth = ground_truth(model)
    adapter = adapter_for(model)
    site = f"{adapter.block(truth.layer)}.mlp.fc1:output"
    with hooks(model, capture=[site]) as rec, stop_after(model, adapter.block(truth.layer)):
        model(pixel_values)
    if truth.role == "clean":
        return torch.zeros(rec[site].shape[:2], dtype=torch.bool)
    z = rec[site][..., truth.up]  # (B, N, pairs) pre-activations of the up neurons
    return _pair_output(z, truth.step).mean(-1) > 0.5


# -- named models --------------------------------------------------------------------------------
def tiny_base(seed: int = 0) -> nn.Module:
    """A small random-weight Dinov2Model (4 layers, width 64, 64 px images, 8 px patches)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4, image_size=64, patch_size=8
    )
    config.architectures = ["Dinov2Model"]
    model = Dinov2Model(config).eval()
    with torch.no_grad():  # position embeddings at std 0.2: token norms spread like a trained ViT's (max/median < 2.5)
        model.embeddings.position_embeddings.mul_(10.0)
    return model


TINY_RECIPE = Recipe(probe_images=96, fit_images=16, steps=60, lr=0.1, ratio=(4.0, 8.0))


@functools.lru_cache(maxsize=2)
def _tiny_plant(seed: int) -> Plant:
    return make_plant(tiny_base(seed), dataclasses.replace(TINY_RECIPE, seed=seed))


def _focus_plant(base: nn.Module) -> Plant:
    """The plant for dinov2-s-focus: the shipped one when it matches these weights, else fitted and cached."""
    from sinkless.zoo import cached

    key = fingerprint(base)
    shipped = resources.files("sinkless") / "data" / SHIPPED
    if shipped.is_file():
        plant = Plant.load(str(shipped))
        if plant.base_fingerprint == key:
            return plant
        log.warning("the shipped plant was fitted on other weights (%s != %s); fitting anew", plant.base_fingerprint, key)

    def build(folder: Path) -> None:
        log.info("fitting the planted-vit plant (a few minutes, once)")
        make_plant(base, Recipe(), progress=True).save(folder / "plant.safetensors")

    return Plant.load(cached("planted-vit-s0", key, build) / "plant.safetensors")


def load_named(name: str):
    """Zoo loader for planted-vit, planted-vit-clean, planted-vit-tiny and planted-vit-tiny-clean."""
    from sinkless.zoo import DINOV2_SPEC, Loaded, load

    clean = name.endswith("-clean")
    if name.startswith("planted-vit-tiny"):
        model = tiny_base(0)
        apply_plant(model, _tiny_plant(0), clean=clean)
        adapter = adapter_for(model)
        return Loaded(name, model, adapter, _spec(model, adapter), source="random weights, seed 0")
    base = load("dinov2-s-focus")
    plant = _focus_plant(base.model)
    apply_plant(base.model, plant, clean=clean)
    return Loaded(name, base.model, base.adapter, DINOV2_SPEC, source=f"dinov2-s-focus + plant ({base.source})")


# -- measured properties -------------------------------------------------------------------------
@torch.no_grad()
def properties(planted_model: nn.Module, clean_model: nn.Module, pixels: torch.Tensor, base_model: nn.Module | None = None) -> dict:
    """What the plant does on these images, next to its clean twin (and the unplanted base, if given).

    Returns the share of planted patches, their norm / median per layer (and the largest ratio of
    any other patch), their neighbour similarity, the attention share they draw, and how far the
    other patches' and CLS outputs move from the clean twin.
    """
    adapter = adapter_for(planted_model)
    truth = ground_truth(planted_model)
    n_layers = adapter.num_layers(planted_model)
    sites = [adapter.residual_site(i) for i in range(n_layers)] + [adapter.attention_site(i) for i in range(n_layers)]
    sites.append(adapter.patch_embed_site())
    mask = planted_tokens(planted_model, pixels)  # (B, N)
    n_prefix = 1 + adapter.n_registers(planted_model)

    def run(model):
        with eager_attention(model), hooks(model, capture=sites) as rec:
            out = model(pixels).last_hidden_state
        return rec, out

    rec_p, out_p = run(planted_model)
    rec_c, out_c = run(clean_model)
    patches = mask[:, n_prefix:]  # (B, P)
    with_planted = patches.any(1)
    grid = (pixels.shape[-2] // adapter.patch_size(planted_model), pixels.shape[-1] // adapter.patch_size(planted_model))
    redundancy = neighbor_similarity(rec_p[adapter.patch_embed_site()], grid)
    layers = []
    for i in range(n_layers):
        norms = rec_p[adapter.residual_site(i)].norm(dim=-1)[:, n_prefix:]  # (B, P)
        ratio = norms / norms.median(1, keepdim=True).values
        clean_norms = rec_c[adapter.residual_site(i)].norm(dim=-1)[:, n_prefix:]
        attn = rec_p[adapter.attention_site(i)].mean(1)  # (B, N, N)
        to_planted = (attn * mask[:, None, :]).sum(-1)  # (B, N): mass each query sends to planted tokens
        queries = ~mask
        queries[:, 0] = False
        layers.append({
            "layer": i,
            "planted_ratio_mean": float(ratio[patches].mean()) if patches.any() else None,
            "planted_ratio_min": float(ratio[patches].min()) if patches.any() else None,
            "other_ratio_max": float(ratio[~patches].max()),
            "clean_ratio_max": float((clean_norms / clean_norms.median(1, keepdim=True).values).max()),
            "attention_share_cls": float(to_planted[with_planted, 0].mean()) if with_planted.any() else None,
            "attention_share_patches": float(((to_planted * queries).sum(1) / queries.sum(1))[with_planted].mean()) if with_planted.any() else None,
        })
    cosine = F.cosine_similarity(out_p, out_c, dim=-1)  # (B, N)
    result = {
        "plant_layer": truth.layer,
        "neurons": truth.neurons,
        "n_images": int(pixels.shape[0]),
        "planted_fraction": float(patches.float().mean()),
        "planted_fraction_max_image": float(patches.float().mean(1).max()),
        "images_without_planted": int((~with_planted).sum()),
        "neighbor_similarity_planted": float(redundancy[patches].mean()) if patches.any() else None,
        "neighbor_similarity_other": float(redundancy[~patches].mean()),
        "cosine_to_clean_other_patches": float(cosine[:, n_prefix:][~patches].mean()),
        "cosine_to_clean_planted_patches": float(cosine[:, n_prefix:][patches].mean()) if patches.any() else None,
        "cosine_to_clean_cls": float(cosine[:, 0].mean()),
        "layers": layers,
    }
    if base_model is not None:
        out_b = base_model(pixels).last_hidden_state
        result["clean_vs_base_max_abs_diff"] = float((out_c - out_b).abs().max())
        cos_base = F.cosine_similarity(out_c, out_b, dim=-1)
        result["clean_vs_base_min_cosine"] = float(cos_base.min())
        result["clean_vs_base_mean_cosine"] = float(cos_base.mean())
    return result


def detection(planted_loaded, clean_loaded, images) -> dict:
    """How well ``sinkless scan``'s automatic rule finds the planted tokens: precision and recall per layer."""
    from sinkless.scan import ImageInput, ScanSettings, scan

    items = [ImageInput(f"crop{i}", image) for i, image in enumerate(images)]
    report, records = scan(planted_loaded, items, ScanSettings(attention=False), progress=False)
    truth = planted_tokens(planted_loaded.model, to_pixels(images, planted_loaded.image_spec))  # (B, N)

    def score(found: torch.Tensor) -> dict:
        hits = int((found & truth).sum())
        return {
            "flagged": int(found.sum()),
            "precision": hits / int(found.sum()) if found.any() else None,
            "recall": hits / int(truth.sum()) if truth.any() else None,
        }

    per_layer = [{"layer": layer, **score(torch.stack([r.outliers[li] for r in records]))} for li, layer in enumerate(records[0].layers)]
    first = report.summary["first_outlier_layer"]
    at_first = next((row for row in per_layer if row["layer"] == first), None)
    any_layer = score(torch.stack([r.outliers.any(0) for r in records]))
    clean_report, _ = scan(clean_loaded, items, ScanSettings(attention=False), progress=False)
    return {
        "planted_tokens": int(truth.sum()),
        "n_images": len(items),
        "first_outlier_layer": first,
        "outlier_layers": report.summary["outlier_layers"],
        "has_artifacts": report.summary["has_artifacts"],
        "clean_has_artifacts": clean_report.summary["has_artifacts"],
        "clean_max_ratio": clean_report.summary["max_ratio"],
        "at_first_outlier_layer": at_first,
        "any_layer": any_layer,
        "layers": per_layer,
    }


def _main(argv: list[str] | None = None) -> int:
    """``python -m sinkless.planted``: measure planted-vit's properties, or refit its plant."""
    import argparse

    from sinkless.zoo import load

    parser = argparse.ArgumentParser(prog="python -m sinkless.planted", description=_main.__doc__)
    parser.add_argument("--images", type=int, default=48, help="held-out natural crops to measure on")
    parser.add_argument("--seed", type=int, default=777, help="seed of the held-out crops")
    parser.add_argument("--tiny", action="store_true", help="planted-vit-tiny instead of planted-vit")
    parser.add_argument("--refit", metavar="FILE", help="fit the plant anew (Recipe defaults) and save it to FILE")
    parser.add_argument("--scan", action="store_true", help="precision/recall of `sinkless scan`'s outliers against the ground truth")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.refit:
        base = load("dinov2-s-focus").model
        make_plant(base, Recipe(), progress=True).save(args.refit)
        print(f"wrote {args.refit}")
        return 0
    prefix = "planted-vit-tiny" if args.tiny else "planted-vit"
    if args.scan:
        print(json.dumps(detection(load(prefix), load(f"{prefix}-clean"), natural_crops(args.images, seed=args.seed)), indent=2))
        return 0
    planted_model, clean = load(prefix), load(f"{prefix}-clean")
    base = None if args.tiny else load("dinov2-s-focus").model
    pixels = to_pixels(natural_crops(args.images, seed=args.seed), planted_model.image_spec)
    print(json.dumps(properties(planted_model.model, clean.model, pixels, base), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
