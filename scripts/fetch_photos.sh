#!/usr/bin/env bash
# Natural photographs for distillation / DVT Stage-2 training, from Debian's wallpaper packages (no hub needed).
#
#   bash scripts/fetch_photos.sh DIR        # writes DIR/*.jpg: 23 photos, longer side resized to 1280 px
#
# None of them is in the evaluation sets (`--data mini`, the synthetic scenes, the bundled scikit-image
# photos). Sources: mate-backgrounds 1.26.0 (GPL-2+ / CC), plasma-workspace-wallpapers 5.27.5 (LGPL / CC-BY-SA),
# Debian 12. Needs apt-get (download only: nothing is installed) and sinkless's Python environment (Pillow).
set -euo pipefail
out="${1:?usage: bash scripts/fetch_photos.sh DIR}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download mate-backgrounds plasma-workspace-wallpapers >/dev/null 2>&1) \
  || { echo "apt-get download failed (needs Debian/Ubuntu package lists: apt-get update)" >&2; exit 2; }
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/x"; done
mkdir -p "$out"
python - "$work/x" "$out" <<'PY'
import sys
from pathlib import Path
from PIL import Image

root, out = Path(sys.argv[1]), Path(sys.argv[2])
mate = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower"]
plasma = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite", "OneStandsOut",
          "Path", "Volna"]
sources = [(name, next(root.glob(f"usr/share/backgrounds/mate/*/{name}.jpg"))) for name in mate]
for name in plasma:  # the smallest rendering at least 1920 px wide
    images = sorted(root.glob(f"usr/share/wallpapers/{name}/contents/images/*"), key=lambda p: Image.open(p).size[0])
    sources.append((name, next((p for p in images if Image.open(p).size[0] >= 1920), images[-1])))
for name, path in sources:
    image = Image.open(path).convert("RGB")
    image.thumbnail((1280, 1280), Image.BICUBIC)
    image.save(out / f"{name}.jpg", quality=95)
print(f"wrote {len(sources)} photos to {out}")
PY
