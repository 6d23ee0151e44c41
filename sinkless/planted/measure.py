"""What a plant measurably does: its properties next to the clean twin, and how well ``scan`` finds it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sinkless.adapters import adapter_for, eager_attention
from sinkless.hooks import hooks
from sinkless.images import to_pixels
from sinkless.patches import neighbor_similarity
from sinkless.planted.truth import ground_truth, planted_tokens

__all__ = ["properties", "detection"]


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
