"""Headless Chromium for the UI tests (``tests/test_browser.py``): find a browser, drive it with
Selenium, wait for single-page apps by text, save screenshots.

Only Debian's ``chromium`` + ``chromium-driver`` (or any Chrome/Chromium with a matching
chromedriver on PATH) is used: Selenium Manager's driver download is never attempted, so the test
works offline. ``CREDITFLOW_CHROMIUM`` / ``CREDITFLOW_CHROMEDRIVER`` name other binaries.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

INSTALL_HINT = ("install one with `apt-get install -y --no-install-recommends chromium chromium-driver` "
                "(Debian) and `pip install selenium` (the `test` extra), or point CREDITFLOW_CHROMIUM / "
                "CREDITFLOW_CHROMEDRIVER at a Chrome/Chromium and its matching chromedriver")

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_DRIVERS = ("chromedriver", "chromium-driver")


def _which(env: str, names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    if os.environ.get(env):
        path = os.environ[env]
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in extra if os.path.isfile(p) and os.access(p, os.X_OK)), None)


def find_browser() -> tuple[tuple[str, str] | None, str]:
    """``((chromium, chromedriver), "")`` or ``(None, why not + how to install)``."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, f"selenium is not installed; {INSTALL_HINT}"
    browser = _which("CREDITFLOW_CHROMIUM", _BROWSERS, ("/usr/lib/chromium/chromium",))
    driver = _which("CREDITFLOW_CHROMEDRIVER", _DRIVERS, ("/usr/lib/chromium/chromedriver",))
    if not browser or not driver:
        missing = " and ".join(n for n, p in (("a Chromium/Chrome browser", browser), ("chromedriver", driver))
                               if not p)
        return None, f"no headless browser: {missing} not found; {INSTALL_HINT}"
    return (browser, driver), ""


def start_chromium(browser: str, driver: str, log_path: Path, page_load_timeout: float = 180):
    """A headless Chromium session (1600x1000, no sandbox: tests may run as root in containers)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--lang=en-US"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver, log_output=str(log_path))
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(page_load_timeout)
    drv.set_script_timeout(page_load_timeout)
    return drv


class Page:
    """Explicit waits on a Selenium driver, by visible text; screenshots into ``outdirs``."""

    def __init__(self, driver, outdirs: list[Path], timeout: float = 120):
        self.driver = driver
        self.outdirs = outdirs
        self.timeout = timeout
        self.shots: list[Path] = []

    # -- waiting ------------------------------------------------------------------------------
    def until(self, what: str, cond: Callable[[], object], timeout: float | None = None):
        """Poll ``cond`` (exceptions count as not yet) until it returns something truthy."""
        from selenium.common.exceptions import WebDriverException

        deadline = time.monotonic() + (timeout or self.timeout)
        last: BaseException | None = None
        while True:
            try:
                value = cond()
                if value:
                    return value
            except (WebDriverException, LookupError, ValueError) as exc:
                last = exc
            if time.monotonic() > deadline:
                shot = self.screenshot("timeout")
                body = self.body_text()[:3000]
                raise AssertionError(f"timed out waiting for {what} at {self.driver.current_url} "
                                     f"(screenshot {shot}; last error {last!r}); page text:\n{body}")
            time.sleep(0.5)

    def body_text(self) -> str:
        try:
            return self.driver.execute_script("return document.body ? document.body.innerText : ''") or ""
        except Exception:  # noqa: BLE001 (diagnostics only)
            return ""

    def wait_text(self, text: str, timeout: float | None = None) -> None:
        """Until ``text`` is part of the rendered page's visible text."""
        self.until(f"text {text!r}", lambda: text in self.body_text(), timeout)

    def elements_with_text(self, text: str, tag: str = "*", exact: bool = False):
        """Displayed elements (innermost first) whose text contains / equals ``text``."""
        from selenium.webdriver.common.by import By

        lit = _xpath_literal(text)
        pred = f"normalize-space(.)={lit}" if exact else f"contains(normalize-space(.), {lit})"
        found = self.driver.find_elements(By.XPATH, f"//{tag}[{pred}]")
        return [e for e in reversed(found) if e.is_displayed()]

    def wait_element(self, text: str, tag: str = "*", exact: bool = False, timeout: float | None = None):
        return self.until(f"<{tag}> with text {text!r}",
                          lambda: (self.elements_with_text(text, tag, exact) or [None])[0], timeout)

    def click(self, element) -> None:
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        try:
            element.click()
        except Exception:  # noqa: BLE001  (an overlay or a re-render: a JS click does the same)
            self.driver.execute_script("arguments[0].click();", element)

    def open(self, url: str) -> None:
        self.driver.get(url)

    # -- screenshots --------------------------------------------------------------------------
    def screenshot(self, name: str) -> Path:
        """PNG of the viewport into the first output dir, copied to the others; returns its path."""
        fname = f"{len(self.shots):02d}-{name}.png"
        first = self.outdirs[0] / fname
        first.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(first))
        for d in self.outdirs[1:]:
            d.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, d / fname)
        self.shots.append(first)
        return first

    def image_loaded(self, element) -> bool:
        """An <img> fully loaded with a non-empty bitmap."""
        return bool(self.driver.execute_script(
            "const i = arguments[0]; return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0;", element))


def _xpath_literal(text: str) -> str:
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ", \"'\", ".join(f"'{p}'" for p in text.split("'")) + ")"
