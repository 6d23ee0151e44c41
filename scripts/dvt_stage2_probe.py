#!/usr/bin/env python3
"""How far DVT's Stage 2 generalises: variants of the block trained in-process (docs/RESULTS.md, Denoising ViTs).

    python scripts/dvt_stage2_probe.py TRAIN_STAGE1_DIR HELDOUT_DIR [--lr 5e-4] [--steps 300] [--weight-decay 1e-5]
        [--loss dvt|cos] [--no-view-pairs] [--only pos] [--every 100] [--batch 8] [--cache held.pt]
        [--model planted-vit-pos --twin dinov2-s-focus] [--features output|keys]

TRAIN_STAGE1_DIR is the ``stage1/`` folder of a finished ``sinkless denoise --train-denoiser --model
planted-vit-pos --view-pairs 8`` run (its raw / clean / view pairs); HELDOUT_DIR the held-out images. The
held-out raw features of the model (default planted-vit-pos) and the Stage-1 outputs of it and of its clean
twin (default dinov2-s-focus; same seeded views, as ``python -m sinkless.denoise.measure stage2``) are
computed once and cached (``--cache``; one cache per model, twin and features). Then a Stage-2 block
(identity start; the optimiser, schedule and batch of ``train_denoiser``) is trained on the stored pairs and,
every ``--every`` steps, applied to the held-out raw features: printed are its cosine to the twin's Stage-1
features (the yardstick), the share of Stage 1's gain it reaches, and its cosine to the image's own Stage-1
output. Before training it also prints two offsets that need no training: the mean Stage-1 correction of the
training images added at each position, and the held-out images' own mean planted-minus-twin difference
subtracted (an oracle for any position-only correction).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def held_out(folder: str, cache: Path, model: str = "planted-vit-pos", twin: str = "dinov2-s-focus",
             features: str = "output") -> dict[str, torch.Tensor]:
    """(N, h, w, D) the model's raw features, its Stage 1, the twin's raw and Stage 1 on the held-out images (cached)."""
    if cache.exists():
        return torch.load(cache)
    from sinkless import zoo
    from sinkless.denoise.measure import paired_stage1
    from sinkless.denoise.stage1 import Stage1Settings
    from sinkless.denoise.train import collect_images

    planted, clean = zoo.load(model), zoo.load(twin)
    settings = Stage1Settings(features=features)
    rows = [paired_stage1(planted, clean, image, settings) for _, image in collect_images([folder])]
    held = {"p_raw": torch.stack([r["a"]["raw"] for r in rows]), "p_clean": torch.stack([r["a"]["clean"] for r in rows]),
            "c_raw": torch.stack([r["b"]["raw"] for r in rows]), "c_clean": torch.stack([r["b"]["clean"] for r in rows])}
    torch.save(held, cache)
    return held


def main() -> None:
    from safetensors.torch import load_file

    from sinkless.denoise.stage2 import Denoiser, DenoiserConfig
    from sinkless.denoise.train import DenoiserSettings, denoising_loss
    from sinkless.training import TrainSettings, learning_rate

    real = DenoiserSettings()  # `sinkless denoise --train-denoiser`'s defaults: the probe varies them one at a time

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage1_dir")
    parser.add_argument("heldout")
    parser.add_argument("--lr", type=float, default=real.lr)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=real.weight_decay)
    parser.add_argument("--loss", choices=["dvt", "cos"], default="dvt", help="dvt: MSE + (1 - cos); cos: 1 - cos only")
    parser.add_argument("--no-view-pairs", action="store_true", help="train on the whole images only")
    parser.add_argument("--only", choices=["all", "pos"], default="all", help="pos: train the position embedding alone")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=real.batch, help="pairs per step (default: train_denoiser's)")
    parser.add_argument("--cache", default="dvt_stage2_probe_held.pt")
    parser.add_argument("--model", default="planted-vit-pos", help="the model the Stage-1 pairs are of")
    parser.add_argument("--twin", default="dinov2-s-focus", help="its clean twin (the yardstick's model)")
    parser.add_argument("--features", default="output", choices=["output", "keys"], help="the features the pairs hold")
    args = parser.parse_args()
    torch.manual_seed(0)

    held = held_out(args.heldout, Path(args.cache), args.model, args.twin, args.features)
    raw_h, own_h, twin_h = held["p_raw"], held["p_clean"], held["c_clean"]
    base, stage1 = _cos(raw_h, twin_h), _cos(own_h, twin_h)

    def show(label: str, out: torch.Tensor) -> None:
        to_twin = _cos(out, twin_h)
        per_image = F.cosine_similarity(out, twin_h, dim=-1).mean((1, 2)) - F.cosine_similarity(raw_h, twin_h, dim=-1).mean((1, 2))
        print(f"{label:44s} to the twin's Stage 1 {to_twin:.4f}  share {(to_twin - base) / (stage1 - base) * 100:+5.0f} %  "
              f"to its own Stage 1 {_cos(out, own_h):.4f}  images closer than raw {int((per_image > 0).sum())}/{len(out)}", flush=True)

    stored = [load_file(str(p)) for p in sorted(Path(args.stage1_dir).glob("*.safetensors"))]
    raw = torch.stack([t["raw"] for t in stored])  # (N, h, w, D)
    clean = torch.stack([t["clean"] for t in stored])
    print(f"{len(stored)} training images, {len(raw_h)} held out; Stage 1 on the held-out images: {base:.4f} -> {stage1:.4f}")
    show("raw", raw_h)
    show("Stage 1 (the image's own)", own_h)
    show("+ mean Stage-1 correction of training images", raw_h + (clean - raw).mean(0))
    show("- held-out mean planted-minus-twin (oracle)", raw_h - (raw_h - held["c_raw"]).mean(0))
    if not args.no_view_pairs:
        raw = torch.cat([raw, *(t["view_raw"].float() for t in stored)])
        clean = torch.cat([clean, *(t["view_clean"].float() for t in stored)])

    denoiser = Denoiser(DenoiserConfig(dim=raw.shape[-1], grid=tuple(raw.shape[1:3])))
    params = [p for name, p in denoiser.named_parameters() if args.only == "all" or name == "pos_embed"]
    # the schedule and optimiser of train_denoiser (sinkless.training): warm-up over 15 %, cosine to final_lr
    schedule = TrainSettings(steps=args.steps, lr=args.lr, final_lr=real.final_lr, schedule="cosine",
                             warmup=int(real.warmup * args.steps), weight_decay=args.weight_decay, betas=(0.9, 0.999))
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=schedule.betas, eps=schedule.eps)
    generator = torch.Generator().manual_seed(0)
    for t in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, t - 1)
        index = torch.randint(len(raw), (args.batch,), generator=generator)
        pred = denoiser(raw[index])
        loss = denoising_loss(pred, clean[index]) if args.loss == "dvt" else 1 - F.cosine_similarity(pred, clean[index], dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if t % args.every == 0:
            with torch.no_grad():
                show(f"Stage 2, step {t} (loss {float(loss):.3f})", denoiser(raw_h))


if __name__ == "__main__":
    main()
