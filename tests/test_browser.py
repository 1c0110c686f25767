"""`runex web` in a real browser: headless Chromium, driven through Selenium, retries a failed
partition with its button, and a real consumer runs it. Screenshots of the pages it saw are
kept in test-output/browser/."""

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runex import Runex, trace
from runex.web import Dashboard

from .conftest import ROOT, drain, require, write

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # the `browser` fixture skips (fails under CI)
    webdriver = None

pytestmark = pytest.mark.slow

SHOTS = ROOT / "test-output" / "browser"
KERNEL = """
    import os
    from runex import register_kernel

    @register_kernel("flaky")
    def flaky(record, broken=""):
        if record["n"] == 2 and os.path.exists(broken):
            raise RuntimeError(f"broken while {broken} exists")
        return record
"""
def need_a_browser() -> tuple[str, str]:
    """Chromium and its driver from this machine's packages, and Selenium: their paths, or a
    skip (a failure under CI)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    require(chromium is not None and chromedriver is not None,
            "no chromium or chromedriver (apt-get install chromium chromium-driver)")
    require(webdriver is not None, "no selenium (pip install -e '.[test]')")
    return chromium, chromedriver


@pytest.fixture
def browser():
    """Headless Chromium. Selenium is given the driver's path, so it never runs Selenium
    Manager (which would download a browser)."""
    chromium, chromedriver = need_a_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox",  # tests may run as root
                     "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def screenshot(driver, path: Path) -> Path:
    """The whole page as a PNG, beyond the window (Chromium's DevTools protocol)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


def console_errors(driver) -> list[str]:
    """What the page logged as errors since last asked (CSP violations among them)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"]


def summary(driver) -> str:
    """The page's summary: the overview's queue and consumers, or a run's `PIPELINE: STATUS;
    partitions ...`."""
    return driver.find_element(By.ID, "summary").text


def reload_until(driver, shown, timeout: float = 30) -> None:
    """Reload the page every 0.5 s until `shown()` is true, or `timeout` seconds have passed
    (the assertion after it tells)."""
    deadline = time.monotonic() + timeout
    while not shown() and time.monotonic() < deadline:
        time.sleep(0.5)
        driver.refresh()


def test_a_failed_partition_is_retried_from_the_browser_and_a_consumer_runs_it(project,
                                                                               browser):
    broken = project / "broken"
    broken.touch()
    write(project / "extensions" / "k.py", KERNEL)
    write(project / "workers" / "fast.toml", "max_delay = 0.1\n")
    write(project / "p.toml", '[source]\nuse = "range"\nstop = 4\nsize = 1\n\n'
          f'[[steps]]\nuse = "flaky"\nbroken = "{broken}"\n\n[sink]\nuse = "null"\n\n'
          '[options]\nretries = 0\n')
    rx = Runex()
    run_id = rx.submit("p.toml")
    drain(rx)
    run = rx.show(run_id)
    assert (run.status, run.counts) == ("failed", {"failed": 1, "succeeded": 3})
    server = Dashboard(rx, "127.0.0.1", 0).server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker = subprocess.Popen([sys.executable, "-m", "runex", "worker", "-w", "1", "--profile",
                               "fast"], cwd=project, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        reload_until(browser, lambda: "Consumers: none" not in summary(browser))
        assert summary(browser).endswith(f"Consumers: {trace.HOST} 1 (workers).")  # the real one
        screenshot(browser, SHOTS / "overview.png")
        assert console_errors(browser) == []
        failures = browser.find_element(
            By.XPATH, "//h2[text()='Recent failures']/following-sibling::table[1]")
        failures.find_element(By.LINK_TEXT, run_id).click()
        assert browser.current_url.endswith(f"/runs/{run_id}")
        assert summary(browser).startswith("p: failed; partitions 1 failed, 3 succeeded;")
        screenshot(browser, SHOTS / "run-failed.png")
        assert console_errors(browser) == []
        broken.unlink()  # what made it fail is fixed
        row = browser.find_element(By.XPATH, "//tr[td/span[text()='failed']]")
        assert row.find_element(By.NAME, "partition").get_attribute("value") == "2"
        row.find_element(By.XPATH, ".//button[text()='retry']").click()
        WebDriverWait(browser, 10).until(staleness_of(row))  # posted, then sent back (303)
        assert browser.current_url.endswith(f"/runs/{run_id}")
        # No reload: the page follows the run by itself, and shows it anew once it is over.
        with contextlib.suppress(TimeoutException):
            WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException]
                          ).until(lambda d: summary(d).startswith("p: succeeded;"))
        shown = summary(browser)
        screenshot(browser, SHOTS / "run.png")
        assert console_errors(browser) == []
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
        server.shutdown()
        server.server_close()
    assert shown.startswith("p: succeeded;"), f"after 30 s: {shown!r}; the worker: {stderr}"
    assert worker.returncode == 0, stderr
    run = rx.show(run_id)
    assert (run.status, run.counts) == ("succeeded", {"succeeded": 4})
    attempts = [a["status"] for a in next(p for p in run.partitions if p.index == 2).attempts]
    assert attempts == ["failed", "succeeded"]


def test_scripts_screenshot_writes_the_pictures_of_the_readme(tmp_path):
    need_a_browser()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot"),
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [str(tmp_path / "overview.png"), str(tmp_path / "run.png")]
    for name in ("overview.png", "run.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
