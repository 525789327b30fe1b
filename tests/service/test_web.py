"""The status page in a real browser (headless Chromium from the system packages, driven by Selenium) against
`expunge serve` in its own process: sign in, the queue count changes after a submission, the batch and the verified
ledger appear once a worker has applied it."""

import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from expunge.service import Database, Worker, sqlite_url, tokens

from .test_worker import environment


def chromium():
    """(browser, driver) paths, or a skip saying what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install 'expunge[service]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium or its driver is not installed (apt-get install chromium chromium-driver)")
    return browser, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(runs, tmp_path):
    """`expunge serve` on a free loopback port, without workers (the test applies the queue itself)."""
    db_url = sqlite_url(tmp_path / "service.sqlite")
    db = Database(db_url).create()
    made = {role: tokens.create(db, role, f"{role} person")[0] for role in tokens.ROLES}
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "expunge", "serve", "--runs", str(runs), "--db", db_url,
                                "--port", str(port), "--workers", "0"], env=environment(), stdout=log,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"{base}/openapi.json", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            log.close()
            raise AssertionError(f"expunge serve did not start: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.3)
    yield base, made, db
    process.terminate()
    process.wait(30)
    log.close()
    db.dispose()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.implicitly_wait(10)  # find_element waits for the page a click navigates to
    yield driver
    driver.quit()


def sign_in(browser, base, token):
    from selenium.webdriver.common.by import By

    browser.get(f"{base}/")
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()


def arrived_at(browser, path):
    """Wait (a click's navigation is asynchronous) until the browser shows ``path``; fail after 10 s."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(lambda b: b.current_url.endswith(path),
                                     f"the browser stayed at {browser.current_url}, not {path}")


def test_the_status_page_shows_the_queue_change_after_a_submission_in_a_browser(server, browser, runs, digits_ids):
    from selenium.webdriver.common.by import By

    base, made, db = server
    sign_in(browser, base, made["requester"])
    assert "a requester token cannot open the status page" in browser.find_element(By.ID, "login-error").text
    sign_in(browser, base, made["operator"])
    assert browser.find_element(By.ID, "queue-digits").text == "0"
    assert browser.find_element(By.ID, "queued-total").text == "0"
    row = browser.find_element(By.ID, "run-digits").text
    assert "deltagrad" in row and "T0=5" in row
    assert "verified" in browser.find_element(By.ID, "ledger-digits").text

    response = httpx.post(f"{base}/v1/runs/digits/requests", json={"ids": digits_ids[:3], "reference": "T-9"},
                          headers={"Authorization": f"Bearer {made['requester']}"})
    assert response.status_code == 202
    browser.refresh()
    assert browser.find_element(By.ID, "queue-digits").text == "1"
    assert browser.find_element(By.ID, "queued-total").text == "1"
    assert "deadline in 30.0 d" in browser.find_element(By.ID, "run-digits").text

    Worker(runs, db).drain()
    browser.refresh()
    assert browser.find_element(By.ID, "queue-digits").text == "0"
    batches = browser.find_element(By.ID, "batches").text
    assert "committed" in batches and "3 ids" in batches
    assert "verified" in browser.find_element(By.ID, "ledger-digits").text
    assert "T-9" in browser.page_source  # the request's ledger row, with its reference
    browser.find_element(By.ID, "sign-out").click()
    arrived_at(browser, "/login")
    browser.get(f"{base}/")
    assert browser.current_url.endswith("/login")
