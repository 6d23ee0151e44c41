"""``sinkless train-attn``: train (or fine-tune) a small model with one attention variant and measure its sinks."""

from __future__ import annotations

import argparse

from sinkless.attention.convert import VARIANTS
from sinkless.attention.data import TEXT_SOURCES
from sinkless.attention.train import TASKS
from sinkless.errors import SinklessError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train-attn",
        help="train a small LM / ViT with softmax, sigmoid, ELU+1, gated or sink-logit attention, then measure its sinks",
        description=__doc__ + " Writes OUT/result.json (loss curve, held-out loss, first-token attention per layer, "
        "Sink_eps, largest activation / median, outlier tokens), OUT/report.json (the scan report), OUT/model/ "
        "(reload with sinkless.attention.load) and a resumable checkpoint.",
    )
    parser.add_argument("--variant", required=True, choices=VARIANTS, help="attention variant")
    parser.add_argument("--task", default="lm", choices=TASKS, help="lm: Llama-style LM on offline English text; vit: tiny ViT on natural crops")
    parser.add_argument("--size", default="small", choices=["tiny", "small"], help="model and budget preset (tiny: a smoke test in seconds)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="training steps (default: the size's budget; --from: 40)")
    parser.add_argument("--from", dest="from_model", metavar="MODEL",
                        help="fine-tune this pretrained causal LM (e.g. smollm2-135m) converted to --variant, instead of training from scratch")
    parser.add_argument("--device", default="cpu", metavar="{cpu,cuda,auto}", help="where to train (default cpu; cuda trains in bf16 autocast)")
    parser.add_argument("--seed", type=int, default=0, help="base weights, data order (default 0): keep it equal across variants")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the size's)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences / images per step (default: the size's)")
    parser.add_argument("--gate", default=None, choices=["elementwise", "headwise"], help="gated: one gate per channel (elementwise, the default) or per head")
    parser.add_argument("--text-source", action="append", choices=TEXT_SOURCES, metavar="NAME",
                        help=f"lm: text source, repeatable ({', '.join(TEXT_SOURCES)}; default: every available one)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (same command line)")
    parser.add_argument("--out", required=True, metavar="DIR", help="result folder (must be new unless --resume)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sinkless.attention.train import train_attention

    result = train_attention(
        args.variant, args.task, args.out, size=args.size, steps=args.steps, device=args.device, from_model=args.from_model,
        resume=args.resume, seed=args.seed, lr=args.lr, batch=args.batch_size, sources=args.text_source, gate=_gate(args),
        progress=not args.quiet,
    )
    m, e = result["metrics"], result["eval"]
    first = ", ".join(f"{v:.2f}" if v is not None else "-" for v in m["first_token_attention"])
    print(f"{result['variant']} ({result['task']}, {result['steps_done']} steps, {result['train_seconds']:.0f} s): "
          f"held-out loss {e['eval_loss']:.4f}" + (f", ppl {e['eval_ppl']:.2f}" if "eval_ppl" in e else f", accuracy {e['eval_accuracy']:.3f}"))
    print(f"  first-token attention per layer: {first}; Sink_eps {m['sink_epsilon_mean'] or 0:.2f}; "
          f"largest activation {m['max_activation']:.1f} = {m['max_activation_ratio']:.0f}x median (layer {m['max_activation_layer']}); "
          f"outlier tokens {m['outlier_tokens']}")
    print(f"  written: {args.out}/result.json, report.json, model/")
    return 0


def _gate(args: argparse.Namespace) -> str:
    if args.gate is not None and args.variant != "gated":
        raise SinklessError(f"--gate applies to --variant gated, not {args.variant}", fix="drop --gate, or pass --variant gated")
    return args.gate or "elementwise"
