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


def walk_tabs(page, names: list[str], shots) -> None:
    """Click every tab of a report page in turn: only its panel is visible, it is selected, every
    image in it decoded; a full-page screenshot of each lands in ``shots`` (a directory)."""
    assert page.get_by_role("tab").all_inner_texts() == names
    panels = page.locator('[role="tabpanel"]')
    for i, name in enumerate(names):
        tab = page.get_by_role("tab", name=name, exact=True)
        tab.click()
        assert [panels.nth(j).is_visible() for j in range(len(names))] == [j == i for j in range(len(names))]
        assert tab.get_attribute("aria-selected") == "true"
        widths = page.eval_on_selector_all(f"#panel-{i} img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
        assert all(w and w > 0 for w in widths), (name, widths)
        shot = shots / f"tab-{i}.png"
        page.screenshot(path=shot, full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot of tab {name!r}: {shot}")
