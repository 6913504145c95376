"""Debian's chromium, headless, driven by Playwright's sync API: for tests that open the project's
HTML reports as a user would. ``make test`` installs both (``playwright`` with the test extra,
``chromium`` through apt in ``make browser-deps``); without them a test skips, naming that target."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest

INSTALL_TARGET = "make browser-deps"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def system_chromium() -> str | None:
    """The system chromium's executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium_page(width: int = 1400, height: int = 900):
    """``(page, requests, errors)``: a fresh page in headless chromium, the URL of every request it
    makes and every page error or console error it reports. Skips the test when playwright or the
    system chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (the test extra: `make install`)")
    executable = system_chromium()
    if executable is None:
        pytest.skip(f"no system chromium on PATH (`{INSTALL_TARGET}` installs it)")
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            yield page, requests, errors
        finally:
            browser.close()
