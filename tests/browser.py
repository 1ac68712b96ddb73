"""A real headless browser for the tests: Chromium (Debian's ``chromium`` package) driven from
its command line — a screenshot of a page and the page's DOM after it loaded.

Each run has its own profile directory and a hard timeout; every process it started is found
afterwards by a tag in its environment (Chromium's helpers inherit it, whatever session or
process group they move to) and the test fails if one is left. Without Chromium the caller is
skipped, unless ``TRAINCTL_REQUIRE_CHROMIUM=1`` (CI sets it), where it fails instead.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import assert_no_leftovers

BROWSER_TIMEOUT_S = 60
WINDOW = (1280, 1400)


def chromium_or_skip() -> str:
    """The Chromium executable; skips (or fails, with TRAINCTL_REQUIRE_CHROMIUM=1) without."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "chromium is not installed (Debian package: chromium)"
        if os.environ.get("TRAINCTL_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"TRAINCTL_REQUIRE_CHROMIUM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


@dataclasses.dataclass(frozen=True)
class Rendered:
    screenshot: bytes
    """The PNG Chromium took of the page, `WINDOW` pixels."""
    dom: str
    """The page's DOM after loading, serialised (its text is what a reader sees)."""


def _chromium(chromium: str, page: Path, workdir: Path, *args: str) -> str:
    tag = f"chromium-{uuid.uuid4().hex[:12]}"
    profile = workdir / f"profile-{tag}"
    command = [
        "timeout",
        "-s",
        "KILL",
        str(BROWSER_TIMEOUT_S),
        chromium,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-breakpad",  # no crash handler processes outliving the browser
        "--disable-crash-reporter",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
        page.as_uri(),
    ]
    env = {**os.environ, "TRAINCTL_JOB_ID": tag, "HOME": str(workdir)}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workdir)
    finally:
        assert_no_leftovers(tag, wait_s=10)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def render(page: Path, workdir: Path) -> Rendered:
    """Open `page` (a local file) in headless Chromium: its screenshot and its DOM."""
    chromium = chromium_or_skip()
    shot = workdir / "screenshot.png"
    dom = _chromium(chromium, page, workdir, f"--screenshot={shot}", "--dump-dom")
    assert shot.is_file(), "chromium took no screenshot"
    return Rendered(shot.read_bytes(), dom)


def ink(png: bytes) -> tuple[int, float]:
    """How much is drawn on a screenshot: (distinct colours, share of pixels that differ from
    the most common colour, the background)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    counts = image.getcolors(maxcolors=1 << 24)
    assert counts is not None
    background = max(counts)[0]
    total = image.width * image.height
    return len(counts), 1 - background / total


def page_text(dom: str) -> str:
    """The text of a serialised DOM (what a reader sees, tags dropped), whitespace collapsed."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []

        def handle_data(self, data: str) -> None:
            self.parts.append(data)

    parser = Text()
    parser.feed(dom)
    return " ".join(" ".join(parser.parts).split())


LEGEND = (
    "productive",
    "checkpoint_stall",
    "failure_detection",
    "restore",
    "checkpoint committed (durable)",
    "checkpoint restored",
    "node excluded",
    "failure (node: cause)",
)


def check_report_page(page: Path, workdir: Path, lanes: list[str], failures: list[str]) -> None:
    """`page` renders in Chromium: not blank, and its text names every lane, every failure
    label and every legend entry."""
    shown = render(page, workdir)
    num_colours, drawn = ink(shown.screenshot)
    assert num_colours >= 20, f"only {num_colours} colours: a blank or broken page"
    assert drawn >= 0.05, f"only {drawn:.1%} of the screenshot differs from the background"
    text = page_text(shown.dom)
    for expected in [*lanes, *failures, *LEGEND, "time since job start", "goodput"]:
        assert expected in text, f"{expected!r} not in the page's text"
