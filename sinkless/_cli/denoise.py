"""``sinkless denoise``: Denoising ViTs (DVT, Yang et al. 2024) in pure PyTorch.

Stage 1 (per image): many crops of each image; their features split into a clean field F, the
position-tied artifact G of the model and a small residual h. Writes per image the features
(<name>.safetensors: raw, clean, artifact, residual) and a figure raw | clean | artifact | residual,
the mean artifact of the model (artifact.png) and denoise.json (settings, timings).

Stage 2 (--train-denoiser): one transformer block trained on the Stage-1 outputs of a folder of
images; apply it with `sinkless compare --fix dvt --denoiser DIR` (or sinkless.denoise in Python).
"""

from __future__ import annotations

import argparse

from sinkless.devices import add_device_args
from sinkless.errors import SinklessError

EPILOG = """\
examples:
  sinkless denoise --model planted-vit-pos photo.jpg photos/ --out dvt-out/
  sinkless denoise --train-denoiser --model planted-vit-pos --images crops/ --out denoiser/ [--device cuda]
  sinkless compare --model planted-vit-pos --fix none --fix dvt --denoiser denoiser/ --task probe --data mini
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("denoise", help="DVT: per-image denoising (Stage 1) or training the denoiser (Stage 2)",
                            description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="Stage 1: image files, folders or globs")
    parser.add_argument("--model", required=True, help="zoo name (see `sinkless models`), hub id or local folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--train-denoiser", action="store_true", help="Stage 2: train the generalizable denoiser on --images")
    parser.add_argument("--images", metavar="DIR", help="Stage 2: folder of training images")
    stage1 = parser.add_argument_group("Stage 1 (defaults: the measured CPU budget; DVT's reference: 768 views, 25,000 steps)")
    stage1.add_argument("--views", type=int, default=None, metavar="N", help="random crops per image (default 24)")
    stage1.add_argument("--steps", type=int, default=None, metavar="N", help="fit steps per image (default 300)")
    stage1.add_argument("--field", choices=["hashgrid", "fourier"], default=None, help="coordinate network (default hashgrid)")
    stage1.add_argument("--features", choices=["output", "keys", "residual"], default=None,
                        help="what to denoise: the last layer's output after the final norm (default, as DVT), its keys, or the raw residual stream")
    stage1.add_argument("--layer", type=int, default=None, metavar="L", help="layer to read (default -1: the last)")
    stage1.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="area of the random crops, as a share of the image (default 0.5 1.0; DVT's reference: 0.1 0.5)")
    stage1.add_argument("--flip", action="store_true", help="also flip half of the crops left-right (DVT's reference does)")
    stage1.add_argument("--amp", choices=["auto", "bf16", "off"], default=None,
                        help="bf16 autocast for the crops' forwards: auto (default: CUDA, CPUs with AMX/AVX512-BF16), bf16, off")
    stage1.add_argument("--seed", type=int, default=0)
    stage1.add_argument("--no-figures", action="store_true", help="Stage 1: features and JSON only")
    stage2 = parser.add_argument_group("Stage 2")
    stage2.add_argument("--train-steps", type=int, default=None, metavar="N", help="training steps of the block (default 2000)")
    stage2.add_argument("--batch-size", type=int, default=None, metavar="N", help="images per training step (default 8)")
    stage2.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4)")
    stage2.add_argument("--holdout", type=int, default=None, metavar="N", help="keep the last N images out of training and report on them")
    stage2.add_argument("--view-pairs", type=int, default=None, metavar="K",
                        help="per image, K of its Stage-1 crops also train the block (their features -> F at their centres; default 8, 0: only the whole image)")
    stage2.add_argument("--init", choices=["identity", "dvt"], default=None,
                        help="the block's start: identity (default: zero position embedding and output projections) or dvt (the reference's random init)")
    stage2.add_argument("--target", choices=["clean", "raw-minus-artifact"], default=None,
                        help="what the block learns to output: clean (default: Stage 1's field F, as DVT) or raw-minus-artifact "
                             "(its input minus the image's fitted position-tied map G: removes what sits at grid positions, keeps detail)")
    stage2.add_argument("--select", choices=["last", "best"], default=None,
                        help="weights to keep: the last step's (default) or best: those of the step closest to the --holdout images' Stage-1 targets")
    stage2.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N images of --images")
    stage2.add_argument("--resume", action="store_true", help="continue an interrupted training run in --out")
    add_device_args(parser)
    parser.set_defaults(run=run)


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict:
    return {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag) is not None}


def run(args: argparse.Namespace) -> int:
    from sinkless.denoise import DenoiserSettings, Stage1Settings
    from sinkless.denoise.run import denoise_files, train_from_folder

    stage1 = Stage1Settings(seed=args.seed, **_given(args, {"views": "views", "steps": "steps", "field": "field", "features": "features", "layer": "layer",
                                                            "amp": "amp"}),
                            **({"scale": tuple(args.crop_scale)} if args.crop_scale else {}), **({"flip": True} if args.flip else {}))
    if args.train_denoiser:
        if args.inputs:
            raise SinklessError("--train-denoiser reads its images from --images, not from INPUTs", fix="move the INPUTs into one folder and pass --images DIR")
        if not args.images:
            raise SinklessError("--train-denoiser needs --images DIR", fix="pass a folder of training images")
        settings = DenoiserSettings(**_given(args, {"train_steps": "steps", "batch_size": "batch", "lr": "lr", "holdout": "holdout", "view_pairs": "view_pairs",
                                                      "init": "init", "select": "select", "target": "target"}))
        summary = train_from_folder(args.model, args.images, args.out, settings, stage1, resume=args.resume, device=args.device,
                                    dtype=args.dtype, limit=args.limit, progress=not args.quiet)
        timing = summary["stage1_timing"]
        print(f"{summary['model']}: denoiser trained on {summary['n_train']} images ({summary['steps_done']} steps, final loss {summary['loss_curve'][-1]['loss']:.4f})")
        if timing["seconds_per_image"]:
            print(f"stage 1: {timing['images_fitted_now']} images fitted, {timing['seconds_per_image']:.1f} s per image")
        if summary.get("holdout"):
            h = summary["holdout"]
            print(f"held out ({h['n_images']} images): cosine to the Stage-1 features raw {h['cosine_raw_to_stage1']:.4f} -> denoised {h['cosine_denoised_to_stage1']:.4f}")
        if summary["selected"]["rule"] == "best":
            print(f"kept the weights of step {summary['selected']['step']} of {summary['steps_done']} (best on the held-out images)")
        print(f"wrote {args.out}/denoiser.safetensors, config.json, train_log.json")
        return 0
    stray = [flag for flag, value in (("--images", args.images), ("--resume", args.resume), ("--train-steps", args.train_steps),
                                      ("--batch-size", args.batch_size), ("--lr", args.lr), ("--holdout", args.holdout), ("--limit", args.limit),
                                      ("--view-pairs", args.view_pairs), ("--init", args.init), ("--select", args.select), ("--target", args.target)) if value not in (None, False)]
    if stray:
        raise SinklessError(f"{stray[0]} only applies with --train-denoiser", fix="add --train-denoiser, or drop it")
    if not args.inputs:
        raise SinklessError("no images given", fix="pass image files, folders or globs (or --train-denoiser --images DIR)")
    report = denoise_files(args.model, args.inputs, args.out, stage1, device=args.device, dtype=args.dtype,
                           figures=not args.no_figures, progress=not args.quiet)
    for row in report["images"]:
        print(f"{row['image']}: {row['timings']['total_s']:.1f} s, |G| = {row['artifact_norm_mean']:.2f} "
              f"({100 * row['artifact_relative']:.1f} % of |raw|), cosine raw-clean {row['cosine_raw_clean']:.3f}")
    written = "features, denoise.json" if args.no_figures else "features, figures, artifact.png, denoise.json"
    print(f"wrote {len(report['images'])} image(s) to {args.out} ({written})")
    return 0
