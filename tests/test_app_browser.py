"""`personalize app` in a real headless Chromium (Debian's `chromium`, driven by Playwright from
PyPI; no browser is downloaded): open the page, pick the `tiny` base, upload synthetic photos,
train a few steps, generate, and see the images in the gallery. A screenshot of each stage is
saved under the test's tmp dir. Skips, saying why, where Chromium or Playwright is missing."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from conftest import write_photos

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and Path(p).is_file()), None)
missing = [m for m in ("gradio", "gradio_client", "playwright") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}: pip install -e \".[test]\""),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium chromium-driver "
                                                "(.ci/run does); no browser is downloaded"),
    pytest.mark.slow,
]


@pytest.fixture
def served(tmp_path):
    from test_app import Served

    s = Served(tmp_path / "workspace")
    yield s
    s.close()


def test_train_and_generate_in_a_browser(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    photos = write_photos(tmp_path / "photos", n=3)
    with sync_playwright() as pw:
        # Debian's binary itself (/usr/bin/chromium is a shell wrapper); no sandbox inside containers
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1800})
            page.goto(served.demo.local_url)
            page.locator("#base input").click()
            page.get_by_role("option", name="tiny (random weights").click()
            page.locator("#photos input[type=file]").set_input_files([str(p) for p in sorted(photos.iterdir())])
            expect(page.locator("#photo-msg")).to_contain_text("3 photo(s) accepted", timeout=30_000)
            expect(page.locator("#thumbs img")).to_have_count(3)
            page.locator("#run-name textarea, #run-name input").first.fill("browser-run")
            for elem, value in (("class-noun", "dog"), ("steps", "3"), ("lr", "0.01"), ("rank", "4"),
                                ("class-images", "2"), ("sample-every", "0")):
                page.locator(f"#{elem} textarea, #{elem} input").first.fill(value)
            page.screenshot(path=str(tmp_path / "1-train-form.png"), full_page=True)
            page.locator("#start").click()
            expect(page.locator("#progress")).to_contain_text("finished", timeout=180_000)
            expect(page.locator("#progress")).to_contain_text("step 3/3")
            page.screenshot(path=str(tmp_path / "2-trained.png"), full_page=True)

            page.get_by_role("tab", name="Generate").click()
            runs = page.locator("#gen-runs input")
            runs.click()
            page.get_by_role("option", name="browser-run").click()
            page.locator("#gen-steps input").fill("2")
            page.locator("#n-images input[type=number]").fill("2")
            page.locator("#n-images input[type=number]").press("Enter")
            page.locator("#generate").click()
            expect(page.locator("#gallery img")).to_have_count(2, timeout=120_000)
            expect(page.locator("#gen-info")).to_contain_text("2 image(s) in")
            shot = tmp_path / "3-generated.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    # what the page shows is what the run dir holds
    out = sorted((served.ws.runs / "browser-run" / "samples").iterdir())[-1]
    assert sorted(p.name for p in out.glob("p*.png")) == ["p00-s0.png", "p00-s1.png"]
