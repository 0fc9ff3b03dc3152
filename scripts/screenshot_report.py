"""Screenshot a demo report (``report.html``) in headless Chromium at a laptop's page width, so that
whether its pictures read at page scale (image names, head labels, captions) is checked on the page a
user opens, not on the PNG files alone.

    python scripts/screenshot_report.py runs/demo/report.html --output runs/demo/report-screenshot.png

Needs a Chromium (``chromium``, ``chromium-headless-shell`` or ``google-chrome``) on the PATH or
given with ``--browser``. Prints the sizes of the report's pictures as the page shows them (the
scale factor of each) and writes one full-page PNG.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

PAGE_WIDTH = 1280  # a laptop's window; the report's column is at most 960 pixels wide


def find_browser(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-headless-shell", "google-chrome", "chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    sys.exit("No Chromium found: install one (Debian: apt install chromium) or pass --browser.")


def page_height(report: Path) -> int:
    """A height that holds the whole page: the text plus every picture at the column's width."""
    height = 1200
    for img in (report.parent / "figures").glob("*.png"):
        with Image.open(img) as im:
            height += int(im.height * min(1.0, 960 / im.width)) + 120
    return height


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--browser")
    args = ap.parse_args()
    browser = find_browser(args.browser)
    height = page_height(args.report)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={PAGE_WIDTH},{height}",
               f"--screenshot={args.output.resolve()}", args.report.resolve().as_uri()]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"wrote {args.output} ({PAGE_WIDTH}x{height})")
    for img in sorted((args.report.parent / "figures").glob("*.png")):
        with Image.open(img) as im:
            scale = min(1.0, 960 / im.width)
            print(f"{img.name}: {im.width}x{im.height} px, shown at {scale:.2f}x")


if __name__ == "__main__":
    main()
