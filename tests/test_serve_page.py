"""framekv's page (jobs/web/index.html) in a real headless Chromium against `framekv
serve`'s app: pick the library or a video, type a question, ask; the page shows the
answer the Python API gives, the evidence frames as loaded thumbnails (fetched with the
token), one timeline mark per evidence frame at its time, and errors as the server words them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from framekv import Index
from jobs.serve import create_app
from tests.test_serve import SECONDS, TOKEN, free_port

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver")
WAIT = 60  # seconds for the page to answer (a question, then its frames)


@pytest.fixture(scope="module")
def indexed(served_index):
    return served_index


@pytest.fixture(scope="module")
def site(indexed):
    """The app on uvicorn in a thread of this process, on a free loopback port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(indexed[1], token=TOKEN), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def api(indexed):
    with Index(indexed[1]) as ix:
        yield ix


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver: both paths given, so Selenium
    Manager never looks for (or downloads) a driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(browser, site: str, token: str):
    """The page with `token` typed in (its change event lists the videos)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site + "/")
    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token + "\t")
    return WebDriverWait(browser, WAIT)


def ask(browser, question: str, k: int | None = None) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, "question")
    field.clear()
    field.send_keys(question)
    if k is not None:
        browser.find_element(By.ID, "k").send_keys(str(k))
    browser.find_element(By.ID, "ask").click()


LOADED_FRAMES = "return [...document.querySelectorAll('#evidence img')].filter(i => i.complete && i.naturalWidth > 0).length"


@pytest.mark.parametrize("where", ["library", "one video"])
def test_page_shows_the_answer_its_frames_and_their_scores(indexed, site, api, browser, tmp_path, where):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    root, _, questions = indexed
    q = questions[2]
    video = api.video(str(root / "archive" / q.file)).video_id if where == "one video" else None
    wait = open_page(browser, site, TOKEN)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "video")).options) == 1 + len(SECONDS))
    Select(browser.find_element(By.ID, "video")).select_by_value(video or "")
    ask(browser, q.question, k=4)
    wait.until(lambda b: b.find_element(By.ID, "result").is_displayed())

    ref = api.ask(q.question, video=video, k=4)
    assert browser.find_element(By.ID, "answer").text == ref.text
    assert ref.video.uri in browser.find_element(By.ID, "answer-video").text
    assert not browser.find_element(By.ID, "error").is_displayed()
    marks = browser.find_elements(By.CSS_SELECTOR, "#timeline .mark")
    assert sorted(float(m.get_attribute("data-time")) for m in marks) == [e.time for e in ref.evidence]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#evidence img")) == len(ref.evidence) == 4
    wait.until(lambda b: b.execute_script(LOADED_FRAMES) >= 1)
    shot = tmp_path / f"page-{where.replace(' ', '-')}.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    print(f"screenshot: {shot}")


@pytest.mark.parametrize("token, question, message", [
    (TOKEN, "   ", "empty; ask something"),
    ("wrong-token", "what colour is the circle ?", "wrong bearer token"),
])
def test_page_shows_errors(site, browser, token, question, message):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, site, token)
    ask(browser, question)
    wait.until(lambda b: b.find_element(By.ID, "error").is_displayed() and message in b.find_element(By.ID, "error").text)
    assert not browser.find_element(By.ID, "result").is_displayed()
