"""/docs and /redoc render in headless Chromium with no network, from the server's own assets."""

import os
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium, foreign, requested_urls
from tests.stack import STALL_S

OPERATIONS = {"submit_counterfactual", "list_jobs", "get_job", "cancel_job", "get_job_file", "metrics"}


def _screenshot(driver, name: str, tmp_path: Path) -> Path:
    """The whole page, into ``PRISM_SCREENSHOT_DIR`` when set (how docs/screenshots is made), else
    the test's tmp."""
    directory = Path(os.environ.get("PRISM_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    driver.set_window_size(width, max(height, driver.execute_script("return document.body.scrollHeight") + 140))
    driver.save_screenshot(str(directory / name))
    driver.set_window_size(width, height)
    return directory / name


def test_swagger_ui_shows_every_operation_offline(service, tmp_path):
    with chromium() as driver:
        driver.get(f"{service.url}/docs")
        WebDriverWait(driver, STALL_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 9)
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "PRISM counterfactual service" in text and "/counterfactual" in text and "/jobs/{job_id}" in text
        assert _screenshot(driver, "docs.png", tmp_path).stat().st_size > 10_000
        urls = requested_urls(driver)
    assert f"{service.url}/openapi.json" in urls and any("/static/docs/swagger-ui-bundle.js" in u for u in urls)
    assert foreign(urls, service.url) == []


def test_redoc_renders_offline(service, tmp_path):
    with chromium() as driver:
        driver.get(f"{service.url}/redoc")
        WebDriverWait(driver, STALL_S).until(lambda d: "Submit an image for a counterfactual edit" in d.page_source)
        operations = {
            e.get_attribute("id").split("/")[-1] for e in driver.find_elements(By.CSS_SELECTOR, "[id^='operation/']")
        }
        assert OPERATIONS <= operations
        _screenshot(driver, "redoc.png", tmp_path)
        urls = requested_urls(driver)
    assert foreign(urls, service.url) == []
