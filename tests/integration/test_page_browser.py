"""The batches page (GET /ui) in a real headless Chromium, against the real stack.

Debian's ``chromium`` and ``chromium-driver`` are driven at ``/usr/bin/chromium`` and
``/usr/bin/chromedriver``, both given explicitly, so Selenium Manager never tries a download
(``scripts/ensure-chromium`` installs them; ``make test`` runs it first). A missing browser or
driver fails the test with that advice: it never skips, under ``CI=true`` or not.

The test signs in (a wrong key first), sees a finished batch, watches a running one appear
through the auto-refresh and make progress, checks the operator view of the project's models,
saves a screenshot (under the test's ``tmp_path`` and, for people, ``var/test-artifacts/``),
downloads a result file through the page and cancels the running batch with its button.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.batch_helpers import create, jsonl, line, upload, wait_terminal
from tests.integration.stack import Stack, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--window-size=1400,1000",
)
#: Where a person finds the last run's screenshot (``var/`` is ignored by git).
STABLE_ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"
#: How long the running batch's slow lines take (the demo echo model's ``echo_delay_s``).
SLOW_LINE_S = 10


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"the browser test needs Debian's chromium and chromium-driver; missing: "
            f"{', '.join(missing)}. Install them with scripts/ensure-chromium (as root; "
            "`make test` runs it). This test never skips.",
            pytrace=False,
        )


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(tmp_path: Path, downloads: Path) -> Iterator[Any]:
    _require_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(
            "selenium is not installed: `.venv/bin/python -m pip install -e '.[test]'`",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


#: One batch row as the page shows it, read in one step: the fragments are swapped in whole on
#: each refresh, so element handles kept across reads could go stale.
_BATCH_ROW_JS = """
const row = document.querySelector(`tr[data-batch-id="${arguments[0]}"]`);
if (!row) return null;
const text = (css) => row.querySelector(css).textContent.trim();
const bar = row.querySelector("progress");
return {
  status: row.dataset.status, label: text(".status"), recorded: text(".recorded"),
  total: text(".total"), completed: text(".completed"), failed: text(".failed"),
  bar: [bar.getAttribute("max"), bar.getAttribute("value")],
  files: [...row.querySelectorAll("a[data-kind]")].map((a) => a.dataset.kind),
  cancel: row.querySelector("button.cancel") !== null,
};
"""
_MODEL_ROWS_JS = """
return [...document.querySelectorAll("#models tr[data-model]")].map((row) => ({
  model: row.dataset.model,
  workers: row.querySelector(".workers").textContent.trim(),
  concurrency: row.querySelector(".concurrency").textContent.trim(),
  rate: row.querySelector(".rate").textContent.trim(),
}));
"""


def _batch(driver: Any, batch_id: str) -> dict[str, Any] | None:
    row: dict[str, Any] | None = driver.execute_script(_BATCH_ROW_JS, batch_id)
    return row


def _status(driver: Any, batch_id: str) -> str | None:
    row = _batch(driver, batch_id)
    return row["status"] if row else None


def _models(driver: Any) -> dict[str, dict[str, str]]:
    return {row["model"]: row for row in driver.execute_script(_MODEL_ROWS_JS)}


def _click(driver: Any, css: str) -> None:
    """A real click on the element ``css`` finds, found again if a refresh replaced it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(10):
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{css} kept being replaced")


def _wait(driver: Any, predicate: Any, what: str, timeout: float = 30) -> Any:
    """``predicate(driver)`` until truthy; on a timeout, the page's error text too."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return wait.until(predicate)
    except TimeoutException:
        errors = driver.execute_script(
            "return [...document.querySelectorAll('.error')].map(e => e.textContent).join(' | ')"
        )
        raise AssertionError(f"timed out waiting for {what}; page errors: {errors!r}") from None


def _sign_in(driver: Any, key: str, project_id: str) -> None:
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_element(By.ID, "signin").is_displayed(), "the sign-in form")
    driver.find_element(By.ID, "api-key").send_keys(key)
    project = driver.find_element(By.ID, "project-id")
    project.clear()
    project.send_keys(project_id)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()


def _save_screenshot(driver: Any, tmp_path: Path) -> Path:
    shot = tmp_path / "batches-page.png"
    # The whole page, not only the first screenful.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, int(height) + 40))
    assert driver.save_screenshot(str(shot)), "Chromium took no screenshot"
    STABLE_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stable = STABLE_ARTIFACTS / shot.name
    shutil.copyfile(shot, stable)
    print(f"\nbatches page screenshot: {shot}\n  (copied to {stable})")
    return shot


def test_the_batches_page_in_headless_chromium(
    stack: Stack, browser: Any, downloads: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    creds = stack.create_project("page", models="demo-echo,other-echo")
    client = stack.client(creds)
    root = stack.base_url.removesuffix("/v1")

    # A finished batch: two answers and a line for a model that does not exist (an error).
    finished_lines = [line("done-1"), line("done-2"), line("done-3", model="no-such-model")]
    finished = wait_terminal(client, create(client, upload(client, jsonl(finished_lines)).id).id)
    assert finished.status == "completed", finished

    shell = requests.get(f"{root}/ui", timeout=10)
    assert shell.status_code == 200, (
        f"GET /ui answered {shell.status_code}: is batchsvc.api.page.bp registered in create_app?"
    )
    browser.get(f"{root}/ui")
    assert browser.title == "batchsvc · batches"

    # A wrong key is refused, and the form says so.
    _sign_in(browser, "bsk_not-a-key", creds["project_id"])
    _wait(
        browser,
        lambda d: "Invalid credentials" in d.find_element(By.ID, "signin-error").text,
        "the refusal of a wrong key",
    )
    assert browser.execute_script("return sessionStorage.length") == 0

    _sign_in(browser, creds["api_key"], creds["project_id"])
    _wait(browser, lambda d: _status(d, finished.id) == "completed", "the finished batch")
    stored = browser.execute_script(
        "return [sessionStorage.getItem('batchsvc.apiKey'), localStorage.length, document.cookie]"
    )
    assert stored == [creds["api_key"], 0, ""], "the key lives in sessionStorage only"
    assert _batch(browser, finished.id) == {
        "status": "completed",
        "label": "completed",
        "recorded": "3",
        "total": "3",
        "completed": "2",
        "failed": "1",
        "bar": ["3", "3"],
        "files": ["input", "output", "errors"],
        "cancel": False,
    }

    # The operator view: exactly the project's two models, demo-echo served by the stack.
    models = _models(browser)
    assert list(models) == ["demo-echo", "other-echo"]
    assert int(models["demo-echo"]["workers"]) >= 1
    assert int(models["demo-echo"]["concurrency"]) >= 1

    # A running batch, created after sign-in: the auto-refresh brings it in.
    running_lines = [line(f"fast-{i}") for i in range(3)] + [
        line(f"slow-{i}", metadata={"echo_delay_s": SLOW_LINE_S}) for i in range(3)
    ]
    started = time.monotonic()
    running = create(client, upload(client, jsonl(running_lines)).id)

    def shows_progress(d: Any) -> dict[str, Any] | None:
        row = _batch(d, running.id)
        return row if row and row["status"] == "in_progress" and row["recorded"] == "3" else None

    row = _wait(browser, shows_progress, "the running batch, its fast lines done", SLOW_LINE_S)
    assert time.monotonic() - started < SLOW_LINE_S, "the slow lines must still be running"
    assert row == {
        "status": "in_progress",
        "label": "in progress",
        "recorded": "3",
        "total": "6",
        "completed": "3",
        "failed": "0",
        "bar": ["6", "3"],
        "files": ["input"],
        "cancel": True,
    }
    # Lines per second: a number once two readings are a second apart.
    _wait(
        browser,
        lambda d: re.fullmatch(r"\d+\.\d", _models(d)["demo-echo"]["rate"]),
        "a lines-per-second figure",
        10,
    )
    _save_screenshot(browser, tmp_path)

    # Download the finished batch's output through the page (a fetch with the key, a blob).
    _click(browser, f'tr[data-batch-id="{finished.id}"] a[data-kind="output"]')
    target = downloads / f"{finished.id}_output.jsonl"
    wait_until(target.exists, 20, f"the download {target}")
    expected = requests.get(
        f"{stack.base_url}/files/{finished.output_file_id}/content",
        headers=stack.headers(creds),
        timeout=10,
    )
    assert target.read_bytes() == expected.content
    assert [r["custom_id"] for r in map(json.loads, target.read_text().splitlines())] == [
        "done-1",
        "done-2",
    ]

    # Cancel the running batch with its button (the page asks first).
    _click(browser, f'tr[data-batch-id="{running.id}"] button.cancel')
    _wait(browser, expected_conditions.alert_is_present(), "the confirmation", 5).accept()
    _wait(
        browser,
        lambda d: _status(d, running.id) in ("cancelling", "cancelled"),
        "the batch cancelling",
    )
    # It ends once its slow lines return (leaving the shared stack's worker idle).
    _wait(
        browser,
        lambda d: _status(d, running.id) == "cancelled",
        "the batch cancelled",
        SLOW_LINE_S + 20,
    )
    cancelled = client.batches.retrieve(running.id)
    assert cancelled.status == "cancelled"
    assert cancelled.request_counts is not None and cancelled.request_counts.completed >= 3
    assert _batch(browser, running.id)["cancel"] is False

    # Forgetting the key clears it and hides the data.
    browser.find_element(By.ID, "forget").click()
    _wait(browser, lambda d: d.find_element(By.ID, "signin").is_displayed(), "the sign-in form")
    assert browser.execute_script("return sessionStorage.length") == 0
    assert not browser.find_elements(By.CSS_SELECTOR, "tr[data-batch-id]")
