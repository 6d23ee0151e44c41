"""``python -m sinkless.planted``: measure planted-vit's properties, or refit its plant."""

from __future__ import annotations

import json
import logging

from sinkless.images import natural_crops, to_pixels
from sinkless.planted.measure import detection, properties
from sinkless.planted.recipe import Recipe, make_plant


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
