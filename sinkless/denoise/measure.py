"""What DVT (Yang et al. 2024) measurably does on models whose truth we know (the figures of docs/RESULTS.md).

``python -m sinkless.denoise.measure pos|planted|stage2 ...`` prints JSON:

- ``pos``: planted-vit-pos vs its clean twin dinov2-s-focus, Stage 1 on the same views of held-out
  images: G's correlation with the planted pattern as it appears at the features DVT reads (on those
  views, and on whole natural images), |G| of both models, and the cosines raw/raw, raw/Stage-1(twin),
  Stage-1/Stage-1(twin) (the twin's own Stage-1 output is the yardstick: a smooth multi-view field differs
  from raw features even without artifacts), and how close Stage 1 stays to the raw twin features.
- ``planted``: planted-vit vs planted-vit-clean: the same cosines, and whether the planted tokens are
  still outliers in norm (at the output) and in key space (Stage 1 run on the last layer's keys).
- ``stage2``: a trained denoiser on held-out images: the share of Stage 1's improvement it reaches, with Stage 1
  fitted on the features the denoiser reads (output or keys); for a model with a content plant (planted-vit) also
  whether its planted tokens are still outliers after each stage.

Shapes: h x w grid, D width.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import torch
import torch.nn.functional as F

from sinkless.denoise.stage1 import Stage1Settings, fit, image_pixels
from sinkless.denoise.views import feature_reader, make_views
from sinkless.errors import SinklessError

__all__ = ["correlation", "paired_stage1", "measure_pos", "measure_planted", "measure_stage2"]

log = logging.getLogger(__name__)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (h, w, D) after removing each one's mean over positions."""
    a = a - a.mean((0, 1))
    b = b - b.mean((0, 1))
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def paired_stage1(first, second, image, settings: Stage1Settings) -> dict:
    """Stage 1 of two models on exactly the same views of ``image``: raw, clean, G of each, and the views' features."""
    out = {}
    pixels = image_pixels(first, image)
    for key, loaded in (("a", first), ("b", second)):
        views = make_views(feature_reader(loaded, settings.features, settings.layer), pixels, settings.views,
                           torch.Generator().manual_seed(settings.seed), scale=settings.scale, ratio=settings.ratio, flip=settings.flip)
        model, _ = fit(views, settings)
        out[key] = {"raw": views.features[-1], "clean": model.clean(views.coords[-1]), "artifact": model.artifact_map(),
                    "views": views.features, "residual": model.residual_of(views.features[-1])}
    return out


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def measure_pos(images, settings: Stage1Settings = Stage1Settings(), calibration: int = 32) -> dict:
    from sinkless import zoo
    from sinkless.images import natural_crops, to_pixels
    from sinkless.planted.positional import output_pattern

    planted, twin = zoo.load("planted-vit-pos"), zoo.load("dinov2-s-focus")
    natural = output_pattern(planted, twin, to_pixels(natural_crops(calibration, seed=5), planted.image_spec))  # (h, w, D)
    rows, g_p, g_c, on_views = [], [], [], []
    for image in images:
        pair = paired_stage1(planted, twin, image, settings)
        p, c = pair["a"], pair["b"]
        truth = (p["views"] - c["views"]).mean(0)  # the pattern at the features DVT reads, on these views
        g_p.append(p["artifact"])
        g_c.append(c["artifact"])
        on_views.append(truth)
        rows.append({
            "corr_G_truth_views": correlation(p["artifact"], truth), "corr_Gdiff_truth_views": correlation(p["artifact"] - c["artifact"], truth),
            "artifact_norm_planted": float(p["artifact"].norm(dim=-1).mean()), "artifact_norm_twin": float(c["artifact"].norm(dim=-1).mean()),
            "raw_norm": float(p["raw"].norm(dim=-1).mean()),
            "cos_raw_raw": _cos(p["raw"], c["raw"]), "cos_raw_stage1twin": _cos(p["raw"], c["clean"]),
            "cos_stage1_stage1twin": _cos(p["clean"], c["clean"]), "cos_twin_stage1_raw": _cos(c["clean"], c["raw"]),
        })
    mean_gp, mean_gc, mean_truth = (torch.stack(x).mean(0) for x in (g_p, g_c, on_views))
    return {
        "model": "planted-vit-pos", "twin": "dinov2-s-focus", "n_images": len(rows), "settings": settings.to_dict(),
        "pattern_norm_natural": float(natural.norm(dim=-1).mean()), "pattern_norm_views": float(mean_truth.norm(dim=-1).mean()),
        "corr_meanG_truth_views": correlation(mean_gp, mean_truth), "corr_meanGdiff_truth_views": correlation(mean_gp - mean_gc, mean_truth),
        "corr_meanG_truth_natural": correlation(mean_gp, natural), "corr_meanGdiff_truth_natural": correlation(mean_gp - mean_gc, natural),
        "corr_truth_views_natural": correlation(mean_truth, natural),
        **{f"mean_{k}": _mean(rows, k) for k in rows[0]},
        "per_image": rows,
    }


def _outlier_stats(features: torch.Tensor, mask: torch.Tensor) -> dict:
    """Planted tokens (mask (h, w)) among the others: norm / median norm, and cosine to the others minus among the others."""
    flat, m = features.reshape(-1, features.shape[-1]), mask.reshape(-1)
    norms = flat.norm(dim=-1)
    unit = F.normalize(flat, dim=-1)
    sim = unit @ unit.T
    others = ~m
    return {
        "planted_norm_ratio": float((norms[m] / norms.median()).mean()) if m.any() else None,
        "max_norm_ratio_others": float((norms[others] / norms.median()).max()),
        "apartness": float(sim[m][:, others].mean() - sim[others][:, others].mean()) if m.any() else None,
    }


def _planted_mask(planted, image) -> torch.Tensor:
    """(h, w) bool: the patches of ``image`` where ``planted``'s content plant fires (planted-vit: CLS, then patches)."""
    from sinkless.planted import planted_tokens

    pixels = image_pixels(planted, image)
    patch = planted.adapter.patch_size(planted.model)
    return planted_tokens(planted.model, pixels)[0, 1:].reshape(pixels.shape[-2] // patch, pixels.shape[-1] // patch)


def measure_planted(images, settings: Stage1Settings = Stage1Settings()) -> dict:
    from sinkless import zoo

    planted, twin = zoo.load("planted-vit"), zoo.load("planted-vit-clean")
    rows = []
    for image in images:
        mask = _planted_mask(planted, image)
        row = {"planted_tokens": int(mask.sum())}
        for features in ("output", "keys"):
            pair = paired_stage1(planted, twin, image, Stage1Settings(**{**settings.to_dict(), "features": features}))
            p, c = pair["a"], pair["b"]
            row[features] = {
                "cos_raw_raw": _cos(p["raw"], c["raw"]), "cos_raw_stage1twin": _cos(p["raw"], c["clean"]),
                "cos_stage1_stage1twin": _cos(p["clean"], c["clean"]),
                "artifact_norm": float(p["artifact"].norm(dim=-1).mean()), "artifact_norm_twin": float(c["artifact"].norm(dim=-1).mean()),
                "raw": _outlier_stats(p["raw"], mask), "stage1": _outlier_stats(p["clean"], mask),
            }
        rows.append(row)
    with_tokens = [r for r in rows if r["planted_tokens"]]

    def avg(features: str, *path: str) -> float | None:
        values = []
        for r in with_tokens if path[0] in ("raw", "stage1") else rows:
            value = r[features]
            for key in path:
                value = value[key]
            values.append(value)
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    summary = {f: {k: avg(f, k) for k in ("cos_raw_raw", "cos_raw_stage1twin", "cos_stage1_stage1twin", "artifact_norm", "artifact_norm_twin")}
               | {f"{s}_{k}": avg(f, s, k) for s in ("raw", "stage1") for k in ("planted_norm_ratio", "max_norm_ratio_others", "apartness")}
               for f in ("output", "keys")}
    return {"model": "planted-vit", "twin": "planted-vit-clean", "n_images": len(rows), "images_with_planted_tokens": len(with_tokens),
            "settings": settings.to_dict(), "summary": summary, "per_image": rows}


def measure_stage2(denoiser_dir: str, model: str, twin: str, images, settings: Stage1Settings = Stage1Settings()) -> dict:
    """On held-out images: cosine to the twin's Stage-1 features of raw, Stage 1 and Stage 2 outputs; the share of Stage 1's gain.
    Stage 1's output is what the denoiser learned: F, or for a ``raw-minus-artifact`` denoiser each model's features - G."""
    from sinkless import zoo
    from sinkless.denoise.stage2 import load_denoiser

    planted, clean = zoo.load(model), zoo.load(twin)
    denoiser = load_denoiser(denoiser_dir)
    # Stage 1 on the features the denoiser was trained on (the final output, or the last layer's keys, ...)
    settings = dataclasses.replace(settings, features=denoiser.config.features, layer=denoiser.config.layer)
    content_plant = _carries_content_plant(planted.model)
    rows, outliers = [], []
    for image in images:
        pair = paired_stage1(planted, clean, image, settings)
        p, c = pair["a"], pair["b"]
        if denoiser.config.target == "raw-minus-artifact":  # Stage 1's output as that denoiser learned it, for both models
            p, c = ({**x, "clean": x["raw"] - x["artifact"]} for x in (p, c))
        with torch.no_grad():
            s2 = denoiser(p["raw"][None])[0]
        rows.append({"raw": _cos(p["raw"], c["clean"]), "stage1": _cos(p["clean"], c["clean"]), "stage2": _cos(s2, c["clean"]),
                     "stage2_to_stage1": _cos(s2, p["clean"]), "raw_to_stage1": _cos(p["raw"], p["clean"])})
        if content_plant:  # planted-vit: are its planted tokens still outliers after each stage?
            mask = _planted_mask(planted, image)
            if mask.any():
                outliers.append({stage: _outlier_stats(x, mask) for stage, x in (("raw", p["raw"]), ("stage1", p["clean"]), ("stage2", s2))})
    mean = {k: _mean(rows, k) for k in rows[0]}
    gain1, gain2 = mean["stage1"] - mean["raw"], mean["stage2"] - mean["raw"]
    result = {"model": model, "twin": twin, "denoiser": denoiser_dir, "features": settings.features, "target": denoiser.config.target,
              "n_images": len(rows),
              "mean_cosine_to_twin_stage1": mean, "share_of_stage1_gain": gain2 / gain1 if gain1 else None}
    if outliers:
        result["planted_tokens"] = {"images_with_planted_tokens": len(outliers)} | {
            stage: {k: _mean([o[stage] for o in outliers], k) for k in outliers[0][stage]} for stage in ("raw", "stage1", "stage2")}
    return result | {"per_image": rows}


def _carries_content_plant(model) -> bool:
    from sinkless.planted import ground_truth

    try:
        return ground_truth(model).role == "planted"
    except SinklessError:
        return False


def main(argv: list[str] | None = None) -> int:
    from sinkless.denoise.train import collect_images

    parser = argparse.ArgumentParser(prog="python -m sinkless.denoise.measure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["pos", "planted", "stage2"])
    parser.add_argument("images", nargs="+", help="held-out images (files, folders, globs)")
    parser.add_argument("--denoiser", help="stage2: the denoiser folder")
    parser.add_argument("--model", default="planted-vit-pos", help="stage2: the model (default planted-vit-pos)")
    parser.add_argument("--twin", default="dinov2-s-focus", help="stage2: its clean twin")
    parser.add_argument("--views", type=int, default=Stage1Settings.views)
    parser.add_argument("--steps", type=int, default=Stage1Settings.steps)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    images = [image for _, image in collect_images(args.images)]
    settings = Stage1Settings(views=args.views, steps=args.steps)
    if args.what == "pos":
        result = measure_pos(images, settings)
    elif args.what == "planted":
        result = measure_planted(images, settings)
    else:
        result = measure_stage2(args.denoiser, args.model, args.twin, images, settings)
    print(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=2))
    if args.json:
        from sinkless._io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
