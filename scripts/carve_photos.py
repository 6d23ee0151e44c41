"""Natural photographs carved out of GCompris's Qt resource files (Debian's gcompris-qt-data), for distillation.

    python scripts/carve_photos.py EXTRACTED_DEB_ROOT OUT_DIR

GCompris (GPL-3+, its images CC-BY-SA / GPL) packs the pictures of its activities into ``*.rcc`` files. Its
photographs of monuments, animals, fish, objects and musicians are a few hundred natural photos of ~320 x 240
px that no evaluation set of sinkless uses. Called by ``bash scripts/fetch_photos.sh --many DIR``.

What is kept, deterministically (rcc files in name order, pictures in file order):
- every embedded JPEG or WebP that decodes and whose shorter side is >= 200 px,
- from the activities whose pictures are photographs (not drawings, paintings or space images),
- unless it looks drawn (4 colours of a 16-level quantisation cover half the picture, or 30 % of horizontal
  neighbours are near-equal), or nearly repeats a picture kept before it (16 x 16 average hash, <= 40 of 256 bits).
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_ACTIVITIES = ("categorization", "explore_monuments", "explore_farm_animals", "explore_world_animals", "erase",
                    "clickgame", "explore_world_music")
MIN_SIDE = 200


def embedded_pictures(blob: bytes):
    """Every JPEG (SOI ... the first EOI that decodes) and WebP (RIFF length) in ``blob`` that decodes."""
    for match in re.finditer(rb"\xff\xd8\xff", blob):
        start, end = match.start(), blob.find(b"\xff\xd9", match.start())
        for _ in range(50):
            if end < 0:
                break
            try:
                image = Image.open(io.BytesIO(blob[start:end + 2]))
                image.load()
                yield image
                break
            except Exception:  # noqa: BLE001 — a marker inside the data: try the next end marker
                end = blob.find(b"\xff\xd9", end + 2)
    for match in re.finditer(rb"RIFF....WEBP", blob, re.S):
        start = match.start()
        length = int.from_bytes(blob[start + 4:start + 8], "little")
        try:
            image = Image.open(io.BytesIO(blob[start:start + 8 + length]))
            image.load()
            yield image
        except Exception:  # noqa: BLE001 — not a whole WebP
            continue


def looks_drawn(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("RGB").resize((128, 96))).astype(int)
    quantised = pixels // 16
    codes = (quantised[..., 0] * 256 + quantised[..., 1] * 16 + quantised[..., 2]).ravel()
    counts = np.sort(np.unique(codes, return_counts=True)[1])[::-1]
    flat = (np.abs(np.diff(pixels, axis=1)).sum(-1) < 3).mean()
    return counts[:4].sum() / counts.sum() >= 0.5 or flat >= 0.3


def average_hash(image: Image.Image) -> np.ndarray:
    grey = np.asarray(image.convert("L").resize((16, 16), Image.BILINEAR)).astype(float)
    return grey > grey.mean()


def main(root: Path, out: Path) -> int:
    files = sorted(root.glob("usr/share/gcompris-qt/rcc/*.rcc"))
    if not files:
        print(f"no GCompris rcc files under {root}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    hashes: list[np.ndarray] = []
    kept = 0
    for path in files:
        if path.stem not in PHOTO_ACTIVITIES:
            continue
        for index, image in enumerate(embedded_pictures(path.read_bytes())):
            image = image.convert("RGB")
            if min(image.size) < MIN_SIDE or looks_drawn(image):
                continue
            code = average_hash(image)
            if any((code != other).sum() <= 40 for other in hashes):
                continue
            hashes.append(code)
            image.save(out / f"gc_{path.stem}_{index:03d}.jpg", quality=95)
            kept += 1
    print(f"wrote {kept} GCompris photos to {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
