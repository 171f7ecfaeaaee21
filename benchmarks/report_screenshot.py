"""Render a run's HTML report in headless Chromium and save a screenshot.

    .venv/bin/python benchmarks/report_screenshot.py --run runs/ml100k [--out report.png]

Needs Debian's `chromium` (apt-get install chromium). Prints the screenshot's path and size;
open it to check that the report renders offline (it has no external resources).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from recdistill.layout import RunLayout

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()
    report = RunLayout(args.run).report
    page = report.index.resolve()
    if not page.exists():
        raise SystemExit(f"{page} not found: run `recdistill report --run {args.run}` first")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    out = (args.out or report.root / "screenshot.png").resolve()
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--window-size=1280,{args.height}", f"--screenshot={out}", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    print(f"{out}  {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
