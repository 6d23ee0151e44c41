#!/usr/bin/env bash
# Natural photographs for distillation / DVT Stage-2 training, from Debian's wallpaper packages (no hub needed).
#
#   bash scripts/fetch_photos.sh DIR            # writes DIR/*.jpg: 23 photos, longer side resized to 1280 px
#   bash scripts/fetch_photos.sh --more DIR     # the same 23 and 15 more (38): the set of the 38-photo students
#   bash scripts/fetch_photos.sh --many DIR     # the 38 and 141 small (~320 x 240) photos carved out of GCompris (179)
#
# None of them is in the evaluation sets (`--data mini`, the synthetic scenes, the bundled scikit-image
# photos). Sources: mate-backgrounds 1.26.0 (GPL-2+ / CC), plasma-workspace-wallpapers 5.27.5 (LGPL / CC-BY-SA),
# Debian 12; with --more also lomiri-wallpapers-16.04 / -20.04 20.04.0 (Ubuntu's free-culture wallpaper contest
# photographs, CC-BY-SA) and one more plasma photo; with --many also gcompris-qt-data 3.1 (GPL-3+ / CC-BY-SA: photos
# of monuments, animals, fish, objects, musicians from its activities; scripts/carve_photos.py). Needs apt-get (download only: nothing is installed) and
# sinkless's Python environment (Pillow).
set -euo pipefail
more=0 many=0
if [[ "${1:-}" == "--more" ]]; then more=1; shift; fi
if [[ "${1:-}" == "--many" ]]; then more=1; many=1; shift; fi
out="${1:?usage: bash scripts/fetch_photos.sh [--more|--many] DIR}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
packages=(mate-backgrounds plasma-workspace-wallpapers)
if (( more )); then packages+=(lomiri-wallpapers-16.04 lomiri-wallpapers-20.04); fi
if (( many )); then packages+=(gcompris-qt-data); fi
(cd "$work" && apt-get download "${packages[@]}" >/dev/null 2>&1) \
  || { echo "apt-get download failed (needs Debian/Ubuntu package lists: apt-get update)" >&2; exit 2; }
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/x"; done
mkdir -p "$out"
python - "$work/x" "$out" "$more" <<'PY'
import sys
from pathlib import Path
from PIL import Image

root, out, more = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
mate = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower"]
plasma = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite", "OneStandsOut",
          "Path", "Volna"]
lomiri = ["Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Kleiber_by_Lukas_Baubkus", "Picture_0B_by_freespace",
          "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
          "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
          "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi"]
if more:
    plasma.append("summer_1am")
sources = [(name, next(root.glob(f"usr/share/backgrounds/mate/*/{name}.jpg"))) for name in mate]
for name in plasma:  # the smallest rendering at least 1920 px wide
    images = sorted(root.glob(f"usr/share/wallpapers/{name}/contents/images/*"), key=lambda p: Image.open(p).size[0])
    sources.append((name, next((p for p in images if Image.open(p).size[0] >= 1920), images[-1])))
if more:
    sources += [(name.split("_by_")[0], root / "usr/share/backgrounds" / f"{name}.jpg") for name in lomiri]
for name, path in sources:
    image = Image.open(path).convert("RGB")
    image.thumbnail((1280, 1280), Image.BICUBIC)
    image.save(out / f"{name}.jpg", quality=95)
print(f"wrote {len(sources)} photos to {out}")
PY
if (( many )); then python "$(dirname "$0")/carve_photos.py" "$work/x" "$out"; fi
