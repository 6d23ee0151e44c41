"""Screenshot a scan's report.html in headless Chromium (the picture in README / docs/report.png).

    python scripts/report_screenshot.py sinkless-out/report.html docs/report.png
    python scripts/report_screenshot.py sinkless-out/report.html shot.png --section-height 0   # the whole page

By default the picture is the top ``--section-height`` pixels of each model's section (verdict,
findings, first figures), stacked below the page header: the whole report at a glance. Uses the same
browser driver as the tests (tests/browser.py): Debian's chromium-headless-shell or chromium.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from tests.browser import Chromium  # noqa: E402

SECTION_TOPS = "[...document.querySelectorAll('section')].map(s => Math.round(s.getBoundingClientRect().top + window.scrollY))"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--section-height", type=int, default=1500, help="pixels kept from the top of each section (0: whole page)")
    args = parser.parse_args()
    full = args.out.with_suffix(".full.png")
    with Chromium(width=args.width, height=900) as browser:
        browser.open(args.report.resolve().as_uri())
        errors = browser.errors()
        facts = browser.page_facts()
        broken = [i["alt"] for i in facts["images"] if not i["naturalWidth"]]
        if errors or broken:
            raise SystemExit(f"the page has problems: errors {errors}, broken images {broken}")
        tops = browser.evaluate(SECTION_TOPS)
        browser.screenshot(full)
    page = Image.open(full).convert("RGB")
    full.unlink()
    if args.section_height <= 0 or not tops:
        picture = page
    else:
        pieces = [page.crop((0, 0, page.width, tops[0]))]
        for top in tops:
            pieces.append(page.crop((0, top, page.width, min(top + args.section_height, page.height))))
        gap = 24
        picture = Image.new("RGB", (page.width, sum(p.height for p in pieces) + gap * (len(pieces) - 1)), (200, 200, 200))
        y = 0
        for piece in pieces:
            picture.paste(piece, (0, y))
            y += piece.height + gap
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, optimize=True)
    print(f"{args.out}: {picture.width}x{picture.height} px, {args.out.stat().st_size // 1024} KiB, {len(facts['images'])} figures decoded, no console errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
