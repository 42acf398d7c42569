"""Fixtures for the console's browser tests: Debian's chromium driven by selenium, against a real
`fmlora serve` (tiny test backbone, embedded worker) on a home seeded with a short history.

Under CI=true a missing browser, driver or selenium fails the run; elsewhere those tests skip with
the install command. Screenshots go to $FMLORA_CONSOLE_SCREENSHOTS (default: a temporary folder);
`FMLORA_CONSOLE_SCREENSHOTS=docs/console python -m pytest tests/e2e/console` regenerates the
committed ones.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.console._seed import seed_home
from tests.e2e.test_serve import ADMIN, Server

API_KEY = "e2e-reader-key-0123456789"
INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
WAIT_S = 20.0


def _missing(what: str) -> None:
    message = f"missing {what}: the console's browser tests need it ({INSTALL})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; under CI=true it is required", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("FMLORA_CONSOLE_SCREENSHOTS")
    directory = Path(configured) if configured else tmp_path_factory.mktemp("console-screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Paths of the browser and its driver, checked before anything else starts."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("selenium")
    browser, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or chromedriver is None:
        _missing("chromium and chromedriver")
    return browser, chromedriver


@pytest.fixture(scope="module")
def driver(chromium: tuple[str, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = chromium
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(flag)
    options.add_argument("--force-device-scale-factor=1")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("console")
    seed_home(base / "home")
    server = Server(
        base / "home",
        base / "server.log",
        env={
            "FMLORA_API_KEY": API_KEY,
            "FMLORA_WORKER_EPOCHS": "2",
            "FMLORA_WORKER_BATCH_SIZE": "8",
            "FMLORA_WORKER_DEVICE": "cpu",
        },
    )
    server.home = base / "home"  # type: ignore[attr-defined]
    try:
        yield server  # not waited for here: the browser starts while the server boots (see `console`)
        assert server.stop() == 0, server.output()[-3000:]
        assert "Traceback" not in server.output()
    finally:
        server.kill()


class Console:
    """The page under test: navigation, the key box, waiting, the browser log and screenshots."""

    def __init__(self, driver: Any, url: str, shots: Path) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url, self.shots, self.By = driver, url, shots, By
        self._wait = WebDriverWait

    def open(self, view: str = "versions") -> None:
        if not self.driver.current_url.startswith(f"{self.url}/console"):
            self.driver.get(f"{self.url}/console#{view}")
        else:
            self.driver.execute_script("window.location.hash = arguments[0]", view)
        self.wait(lambda: self.visible(f"view-{view}"), f"the {view} view")

    def find(self, css: str) -> Any:
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def rows(self, css: str) -> list[list[str]]:
        """The cells' text of every table row matching ``css``, read in one step (the page redraws
        tables as data arrives, so element handles can go stale between two reads)."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map(tr => [...tr.children].map(c => c.textContent.trim()))",
            css,
        )

    def text(self, element_id: str) -> str:
        return self.driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)

    def visible(self, element_id: str) -> bool:
        return self.driver.execute_script("return !document.getElementById(arguments[0]).hidden", element_id)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
        from selenium.common.exceptions import StaleElementReferenceException

        waiter = self._wait(
            self.driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
        )
        return waiter.until(lambda _: condition(), message=f"waited {timeout} s for {what}")

    def drawn(self) -> bool:
        """Whether the page has drawn what the current key may see (see console.js, generations)."""
        return self.driver.execute_script(
            "const d = document.body.dataset; return !!d.keyGeneration && d.keyGeneration === d.renderedGeneration"
        )

    def use_key(self, key: str | None) -> None:
        """Enter (or forget) the key, then wait until the page has redrawn with what that key may see."""
        if key is None:
            self.find("#key-forget").click()
            expected = "no key"
        else:
            field = self.find("#key-input")
            field.clear()
            field.send_keys(key)
            self.find("#key-save").click()
            expected = {ADMIN: "admin", API_KEY: "read-only"}[key]
        self.wait(lambda: self.text("role-badge") == expected, f"the role badge to say {expected}")
        self.wait(self.drawn, "the page to redraw for the new key")

    def activate(self, version: int) -> None:
        """Click a version's activate button, then its confirmation (the same button, re-armed)."""
        css = f'[data-activate="{version}"]'
        self.wait(lambda: self.all(css), f"the button for v{version}")[0].click()
        confirm = self.wait(lambda: [b for b in self.all(css) if b.text.startswith("Confirm")], "the confirmation")
        confirm[0].click()

    def errors(self) -> list[str]:
        """Browser-log entries at SEVERE since the last call (JS errors, CSP violations, failed loads)."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def loaded_from_elsewhere(self) -> list[str]:
        """What this page fetched (or tried to) from anywhere but the server: nothing, offline."""
        names = self.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert names, "the page loaded nothing at all"
        return [n for n in names if not n.startswith(f"{self.url}/")]

    def screenshot(self, name: str, full: bool = True) -> Path:
        """A PNG of the page; ``full``: the window grows to the page's height (up to 2400 px) for the shot."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight") if full else 900
        chrome = self.driver.execute_script("return window.outerHeight - window.innerHeight")
        self.driver.set_window_size(1440, min(max(int(height), 900), 2400) + int(chrome))
        time.sleep(0.2)  # let the layout settle at the new size
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1440, 1000)
        return path


@pytest.fixture(scope="module")
def console(chromium: tuple[str, str], served: Server, driver: Any, screenshots: Path) -> Console:
    served.wait_ready()
    return Console(driver, served.url, screenshots)


def api(served: Server, method: str, path: str, key: str = API_KEY, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, f"{served.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
    )


def models(served: Server) -> dict[str, Any]:
    response = api(served, "GET", "/models")
    assert response.status_code == 200, response.text
    return json.loads(response.text)
