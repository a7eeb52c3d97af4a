"""The report of a run, rendered in headless Chromium: every image loads, no console errors."""

import base64
import pathlib
import shutil

import pytest

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="no headless Chromium: apt-get install chromium chromium-driver (.ci/run"
                    " installs them)")
def test_report_renders_in_chromium_with_every_image_and_no_console_error(study_run):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -r requirements-dev.txt")
    from selenium.webdriver.chrome.service import Service

    workdir, _ = study_run
    page = workdir / "report" / "index.html"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'),"
            " i.complete && i.naturalWidth > 0])")
        errors = [entry["message"] for entry in driver.get_log("browser")
                  if entry["level"] in ("SEVERE", "ERROR")]
        screenshot = workdir / "report_screenshot.png"
        screenshot.write_bytes(base64.b64decode(driver.get_screenshot_as_base64()))
        title = driver.title
    finally:
        driver.quit()
    assert len(images) >= 8, images  # sparsity search, class, confusion, confidence, saliency, ...
    assert [src for src, loaded in images if not loaded] == []
    assert errors == []
    assert title.startswith("compax: lenet5 on tiny")
    assert screenshot.stat().st_size > 10_000 and pathlib.Path(screenshot).read_bytes()[:4] == b"\x89PNG"
