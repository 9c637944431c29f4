"""Headless Chromium (Debian's, driven by Playwright) looking at a served console."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def screenshot_console(
    url: str, admin_credential: str, out: Path, token: str | None = None, image: Path | None = None
) -> dict[str, str]:
    """Sign in, then capture the Overview and the Token tree (and, given a token and an image, the
    Try-it page after a detection); returns each page's visible text."""
    from playwright.sync_api import sync_playwright

    texts: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.get_by_label("Admin credential").fill(admin_credential)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Signed in as").wait_for(timeout=60_000)
            page.get_by_text("Units remaining").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # charts draw after the data arrives
            page.screenshot(path=str(out / "console-overview.png"), full_page=True)
            texts["overview"] = page.inner_text("body")
            page.get_by_text("Token tree", exact=True).click()
            page.get_by_text("Create a package").wait_for(timeout=60_000)
            page.locator("table").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "console-token-tree.png"), full_page=True)
            texts["tree"] = page.inner_text("body")
            if token is not None and image is not None:
                page.get_by_text("Try it", exact=True).click()
                page.get_by_label("Token credential").fill(token)
                page.locator("input[type=file]").set_input_files(str(image))
                page.get_by_role("button", name="Detect").click()
                page.get_by_text("detections").first.wait_for(timeout=120_000)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(out / "console-try-it.png"), full_page=True)
                texts["try"] = page.inner_text("body")
        finally:
            browser.close()
    return texts
