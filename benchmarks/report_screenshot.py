"""Screenshot, in headless Chromium, the pages a person reads: a run's segment report, the A/B
page and the ranking server's API docs.

    .venv/bin/python benchmarks/report_screenshot.py --run runs/synthetic \\
        --ab runs/ab_interleaving --artifact artifacts/synthetic/student [--out-dir runs/screenshots]

Each option adds its pages (at least one is needed): ``--run`` the run's report
(``runs/X/report/index.html``), ``--ab`` the A/B test's ``index.html``, ``--artifact``
``/docs`` (Swagger UI) and ``/redoc`` of a ``recdistill serve`` of that artifact, started on a
free port for the screenshots and stopped after them. Chromium reaches nothing but this
machine: every host name but 127.0.0.1 resolves to nowhere and every other address goes to a
proxy that is not there, so a page that needs the internet shows blank or broken. Each page
gets a few seconds of virtual time for its scripts to render.

Needs Debian's ``chromium`` (apt-get install chromium). Prints a table of the screenshots
(page, file, size, console messages) and then the messages the pages logged, such as a
request the page's Content-Security-Policy or the missing network refused; open the files to
check them.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from recdistill.layout import AbTestLayout, RunLayout
from recdistill.server import free_port, running_server

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# Time the pages' scripts get to render (Swagger UI and ReDoc build the page from the schema).
VIRTUAL_TIME_MS = 5000
DOCS_HEIGHT = 2000
# What a reader sees before scrolling: the report pages are shot at this height too.
FIRST_SCREEN_HEIGHT = 900
CONSOLE_LINE = re.compile(r':CONSOLE[^\]]*\] "(?P<message>.*)", source: (?P<source>\S*)')


@dataclass(frozen=True)
class Page:
    name: str
    url: str
    height: int


@dataclass(frozen=True)
class Shot:
    page: Page
    path: Path
    console: list[str]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run directory: its report/index.html")
    parser.add_argument("--ab", type=Path, help="A/B test directory: its index.html")
    parser.add_argument("--artifact", type=Path, help="artifact to serve: /docs and /redoc")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/screenshots"))
    parser.add_argument("--height", type=int, default=9000, help="of the whole report pages (px)")
    args = parser.parse_args()
    if args.run is None and args.ab is None and args.artifact is None:
        parser.error("name at least one of --run, --ab, --artifact")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    pages = []
    if args.run is not None:
        report = RunLayout(args.run).report.index
        pages += _file_pages("report", report, args.height, f"recdistill report --run {args.run}")
    if args.ab is not None:
        ab = AbTestLayout(args.ab).report.index
        pages += _file_pages("ab", ab, args.height, f"recdistill abtest --out {args.ab}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if args.artifact is not None:
            url = stack.enter_context(_served(args.artifact))
            pages += [Page(name, f"{url}/{name}", DOCS_HEIGHT) for name in ("docs", "redoc")]
        shots = [_screenshot(browser, page, args.out_dir.resolve()) for page in pages]
    _print_table(shots)


def _file_pages(name: str, path: Path, height: int, command: str) -> list[Page]:
    """The whole page (down to ``height``) and its first screen."""
    page = path.resolve()
    if not page.exists():
        raise SystemExit(f"{page} not found: run `{command}` first")
    return [
        Page(name, page.as_uri(), height),
        Page(f"{name}-first-screen", page.as_uri(), FIRST_SCREEN_HEIGHT),
    ]


@contextmanager
def _served(artifact: Path) -> Iterator[str]:
    """The base URL of a ready ``recdistill serve`` of ``artifact``; its impression log and
    output go to a scratch directory, removed with the server."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "impressions.jsonl"
        with running_server([artifact], impressions=log) as server:
            yield server.url


def _offline_flags() -> list[str]:
    """Chromium flags that leave it this machine only: names other than 127.0.0.1 resolve to
    nowhere, and other addresses go through a proxy on a closed local port (loopback
    addresses never go through a proxy)."""
    return [
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--proxy-server=http://127.0.0.1:{free_port()}",
    ]


def _screenshot(browser: str, page: Page, out_dir: Path) -> Shot:
    out = out_dir / f"{page.name}.png"
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [browser, *CHROMIUM_FLAGS, *_offline_flags(), f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
             f"--window-size=1280,{page.height}", f"--screenshot={out}", page.url],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    if run.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium could not screenshot {page.url}:\n{run.stderr[-2000:]}")
    console = [
        f"{match['message']} ({match['source']})"
        for match in map(CONSOLE_LINE.search, run.stderr.splitlines())
        if match
    ]
    return Shot(page, out, console)


def _print_table(shots: list[Shot]) -> None:
    width = max(len(str(shot.path)) for shot in shots)
    print(f"{'page':<20} {'screenshot':<{width}} {'bytes':>10} {'console':>7}  url")
    for shot in shots:
        size = shot.path.stat().st_size
        name, path, messages = shot.page.name, shot.path, len(shot.console)
        print(f"{name:<20} {path!s:<{width}} {size:>10,} {messages:>7}  {shot.page.url}")
    for shot in shots:
        for message in shot.console:
            print(f"{shot.page.name}: console: {message}")


if __name__ == "__main__":
    main()
