"""Headless Chromium for the tests (Debian's chromium and chromium-driver, driven by Selenium; no
browser is downloaded). Every host but loopback is unresolvable, and the requests a page makes
are read back from Chromium's performance log, so a test can check that nothing leaves the server's
own origin."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1280, height: int = 900):
    assert shutil.which(CHROMIUM) and shutil.which(DRIVER), (
        "chromium and chromium-driver: ./scripts/test.sh installs them"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.TemporaryDirectory(prefix="prism-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile.name}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.get_log("performance")  # what the browser did before the test's first page
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


def requested_urls(driver) -> list[str]:
    """Every URL the page has asked the network for so far (from Chromium's performance log);
    requests its Content-Security-Policy blocked never left the browser and are not counted."""
    sent, blocked = {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    return [url for request, url in sent.items() if request not in blocked]


def foreign(urls: list[str], origin: str) -> list[str]:
    """The network URLs (http, https, ws, wss) outside the server's origin."""
    own = urlsplit(origin)
    network = [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
    return [u for u in network if urlsplit(u)[:2] != own[:2]]
