"""``sinkless distill``: give a ViT register tokens and self-distil them (PH-Reg, Chen et al. 2025), no labels.

The frozen model is the teacher: its patch features averaged over shifted and flipped views are the
target. The student (the model + registers) trains its registers, position embeddings, patch embedding
and last block (PH-Reg's choice; --train picks other parts), the two embeddings at 0.1 x the learning rate
(measured: at the full rate they wreck held-out features when training on a few thousand crops; --part-lr). OUT becomes a model folder (`--model OUT` anywhere in sinkless; DINOv2 students also load
with plain transformers as Dinov2WithRegistersModel) with distill_log.json (loss curve, settings, data,
seconds). Interrupted runs continue with --resume and end with the same weights. --teacher ttr takes the targets
from the model with test-time registers instead of the plain model (ours: the training-free fix, learned into
ordinary trained registers).
"""

from __future__ import annotations

import argparse
import re

from sinkless.devices import add_device_args
from sinkless.errors import SinklessError

EPILOG = """\
example:
  sinkless distill --model planted-vit --images photos/ --out planted-vit-reg --steps 300
  sinkless compare --model planted-vit --fix none --fix distilled --distilled planted-vit-reg --task zeroseg --data mini
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("distill", help="train register tokens into a ViT by self-distillation (PH-Reg)", description=__doc__,
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="zoo name, HF hub id or local folder of a DINOv2 / ViT / CLIP / SigLIP vision model")
    parser.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_GLOB",
                        help="training images: folders, files or globs (natural photos; keep your evaluation images out)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder for the distilled model and distill_log.json")
    parser.add_argument("--registers", type=int, default=16, metavar="N", help="register tokens to add (default 16, PH-Reg)")
    parser.add_argument("--steps", type=int, default=300, metavar="N", help="training steps (default 300)")
    parser.add_argument("--views", type=int, default=10, metavar="K", help="teacher views per image (default 10)")
    parser.add_argument("--max-shift", type=int, metavar="PATCHES", help="teacher shifts within ±PATCHES (default: 0.15 of the grid side)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="crops per step (default 8)")
    parser.add_argument("--pool", type=int, default=256, metavar="N",
                        help="training crops whose teacher targets are computed once (default 256; 0: new crops and targets every step, as PH-Reg)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate, decayed exponentially to 5e-6 (default 1e-4)")
    parser.add_argument("--train-blocks", type=int, default=1, metavar="K", help="train the last K blocks (default 1)")
    parser.add_argument("--train", metavar="PARTS", default=None,
                        help="comma-separated parts to train, from registers, positions, patch_embed, blocks (the last --train-blocks), "
                             "last_block (the last block as a part of its own, for its own --part-lr), last_block_out (the last block "
                             "except the norm and query/key/value projections its attention reads: attention maps, keys and values "
                             "stay), final_norm, all "
                             "(default: PH-Reg's registers,positions,patch_embed,blocks)")
    parser.add_argument("--train-all", action="store_true", help="train every weight (same as --train all)")
    parser.add_argument("--part-lr", action="append", default=None, metavar="PART=MULT",
                        help="a trained part's learning rate as a multiple of --lr, e.g. blocks=0.5 (repeatable; "
                             "default: positions=0.1 and patch_embed=0.1 where they train, measured in docs/RESULTS.md)")
    parser.add_argument("--register-std", type=float, default=1e-6, metavar="STD",
                        help="standard deviation of the new registers' initial values (default 1e-6, measured; PH-Reg's: "
                             "1/sqrt(width), about 0.05 for ViT-S)")
    parser.add_argument("--mse-weight", type=float, default=1.0, metavar="W",
                        help="loss = (1 - cosine) + W x MSE on the patch features (default 1, PH-Reg's; 0: cosine only)")
    parser.add_argument("--key-weight", type=float, default=0.0, metavar="W",
                        help="add W x (1 - cosine) between the student's last-layer keys and the teacher's keys averaged over the "
                             "same views (default 0, PH-Reg's features-only loss; ours, for tasks that read the keys: LOST, CLS "
                             "attention; measured in docs/RESULTS.md)")
    parser.add_argument("--teacher", choices=("original", "ttr"), default="original",
                        help="whose features the student learns: the frozen model's, averaged over --views views (default, "
                             "PH-Reg's), or the frozen model's with test-time registers (ttr: the training-free fix baked into "
                             "trained registers; with --views 1 its plain features; ours, measured in docs/RESULTS.md)")
    parser.add_argument("--teacher-neurons", metavar="FILE",
                        help="with --teacher ttr: the register neurons (a `sinkless fix --out FILE` file; default: found on "
                             "the training images)")
    parser.add_argument("--augment", action="store_true",
                        help="also train on each photo turned 90 and 180 degrees and colour-jittered (4x the images; "
                             "for a few dozen photos, measured in docs/RESULTS.md)")
    parser.add_argument("--init", metavar="DIR",
                        help="start the student from this finished distill folder of the same --model (a second stage, e.g. "
                             "--train last_block_out,final_norm on other targets) instead of fresh registers")
    parser.add_argument("--image-size", type=int, metavar="PX", help="side of the square training crops (default: the model's input size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="steps between checkpoints (default 50)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                        help="bf16 autocast for teacher and student (PH-Reg trains so): auto (default) where the hardware has "
                             "native bf16 (CUDA; CPUs with AMX or AVX512-BF16, ~3x faster there), bf16 always, off (float32)")
    add_device_args(parser, dtype=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sinkless.registers.distill import distill

    part_lr = None if args.part_lr is None else []
    for item in args.part_lr or ():
        part, _, multiple = item.partition("=")
        try:
            part_lr.append((part.strip(), float(multiple)))
        except ValueError:
            raise SinklessError(f"--part-lr {item!r} is not PART=MULTIPLIER", fix="write e.g. --part-lr positions=0.1") from None
    try:
        settings = _settings(args, part_lr)
    except SinklessError as error:  # name the flag the user typed, not the settings field behind it
        problem = re.sub(r"^([a-z_]+)(?= must)", lambda m: f"--{m[1].replace('_', '-')}" if m[1] in vars(args) else m[1], error.problem)
        raise SinklessError(problem, fix=error.fix) from None
    result = distill(args.model, args.images, args.out, settings, resume=args.resume, device=args.device, progress=not args.quiet)
    if result.student is None:  # --resume on a finished run of the same job
        print(f"{result.out} already holds this distillation (finished): nothing written")
        return 0
    curve = result.log.get("loss_curve") or []
    last = curve[-1] if curve else {}
    seconds = result.log.get("seconds") or {}
    print(f"{result.log.get('model')}: {result.log.get('steps_done')} steps on {result.log.get('data', {}).get('n_images')} images"
          + (f", final loss {last['loss']:.4f} (patch cosine {last.get('cosine', float('nan')):.4f})" if last else ""))
    if isinstance(seconds, dict) and seconds:
        print(", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in seconds.items()))
    print(f"wrote {args.out} (model folder + distill_log.json)")
    return 0


DEFAULT_TRAIN = "registers,positions,patch_embed,blocks"  # PH-Reg's parts


def _settings(args: argparse.Namespace, part_lr: list | None):
    from sinkless.registers.distill import DistillSettings

    if args.train_all and args.train is not None:
        raise SinklessError(f"--train-all and --train {args.train} both given", fix="keep one: --train-all trains every weight")
    return DistillSettings(
        registers=args.registers, steps=args.steps, views=args.views, max_shift=args.max_shift, batch_size=args.batch_size,
        pool=args.pool, lr=args.lr, train_blocks=args.train_blocks, image_size=args.image_size, seed=args.seed,
        checkpoint_every=args.checkpoint_every, amp=args.amp, part_lr=None if part_lr is None else tuple(part_lr), register_std=args.register_std,
        mse_weight=args.mse_weight, key_weight=args.key_weight, teacher=args.teacher, teacher_neurons=args.teacher_neurons, augment=args.augment, init=args.init, train=("all",) if args.train_all else tuple(p.strip() for p in (args.train or DEFAULT_TRAIN).split(",") if p.strip()),
    )
