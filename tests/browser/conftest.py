"""Fixtures of the browser tests: Debian's Chromium, driven by Playwright (never downloaded)."""

from __future__ import annotations

import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 667}


@pytest.fixture(scope="session")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install "
                    "chromium) to run the browser tests")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """``open_page(url, viewport=..., color_scheme=...)``: a fresh context, console watched.

    ``expected_errors``: console errors the test causes on purpose (exact texts); any other
    error, CSP violations included, fails the test."""
    contexts, problems, expected = [], [], []

    def open_(url: str, viewport: dict = DESKTOP, color_scheme: str = "light",
              device_scale_factor: float = 1, expected_errors: tuple[str, ...] = ()):
        expected.extend(expected_errors)
        context = browser.new_context(viewport=viewport, color_scheme=color_scheme,
                                      device_scale_factor=device_scale_factor)
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        contexts.append(context)
        page = context.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    unexpected = [problem for problem in problems if problem not in expected]
    assert unexpected == [], "the browser console reported errors (CSP violations included)"
