"""The browser page in a real headless Chromium (Selenium): a video file streamed, answers read from the page.

A VP8 WebM written with OpenCV from ``model.synthetic`` is picked in the page's file input and
played; the page sends JPEG frames at the chosen fps to a session on a real loopback server,
asks a question and a multiple-choice question, and shows the answers as they are typed. The
test reads them from the page and asks the same session the same questions over HTTP: the page
must show exactly what the server answers. Once over the WebSocket and once over plain HTTP
(the transport the page uses under Ray Serve), and once from Chromium's fake webcam. A
screenshot of each goes to ``$SERVE_TEST_ARTIFACTS`` (default: the test's temporary folder), and
its path is printed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
selenium = pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from model.serve.app import build_app  # noqa: E402
from model.serve.config import ServerConfig  # noqa: E402
from model.serve.testing import ServerThread  # noqa: E402
from model.synthetic import synthetic_frames  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--use-fake-device-for-media-stream",
         "--use-fake-ui-for-media-stream", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def server(tiny):
    app = build_app(*tiny, ServerConfig(status_interval_s=0.2), "tiny")
    with ServerThread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    """3 s of the synthetic video at 10 fps, VP8 in WebM (what Chromium plays everywhere)."""
    import cv2

    path = str(tmp_path_factory.mktemp("video") / "shapes.webm")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"VP80"), 10, (168, 112))
    assert writer.isOpened(), "OpenCV cannot write VP8 WebM"
    for frame in synthetic_frames(30, 112, 168, seed=9):
        writer.write(frame[:, :, ::-1].copy())
    writer.release()
    return path


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("SERVE_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait(driver, condition, timeout=60, what="condition"):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def ask_in_page(driver, question: str, choices: str = "", max_tokens: int = 8) -> dict:
    n = len(driver.find_elements(By.CSS_SELECTOR, "#answers .answer"))
    driver.find_element(By.ID, "question").clear()
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "choices").clear()
    if choices:
        driver.find_element(By.ID, "choices").send_keys(choices)
    driver.find_element(By.ID, "maxtokens").clear()
    driver.find_element(By.ID, "maxtokens").send_keys(str(max_tokens))
    driver.find_element(By.ID, "askbtn").click()
    box = f"answer-q{n + 1}"
    wait(driver, lambda d: d.find_element(By.ID, box).get_attribute("data-state") in ("done", "error"), what=box)
    el = driver.find_element(By.ID, box)
    return {"state": el.get_attribute("data-state"), "text": el.find_element(By.CSS_SELECTOR, ".a").text,
            "raw": driver.execute_script(f"return document.querySelector('#{box} .a').textContent"),
            "best": el.get_attribute("data-best"), "meta": el.find_element(By.CSS_SELECTOR, ".meta").text}


def http_answer(url: str, sid: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/sessions/{sid}/questions", json=body, timeout=60)
    return json.loads(r.text.strip().split("\n\n")[-1].split("data: ", 1)[1])


def stream_file(driver, url: str, video: str, transport: str) -> str:
    driver.get(f"{url}/" + ("?transport=http" if transport == "http" else ""))
    driver.find_element(By.ID, "file").send_keys(video)
    fps = driver.find_element(By.ID, "fps")
    fps.clear()
    fps.send_keys("4")
    wait(driver, lambda d: d.find_element(By.ID, "start").is_enabled(), what="the start button")
    driver.find_element(By.ID, "start").click()
    wait(driver, lambda d: d.execute_script("return document.getElementById('video').ended"), what="the video's end")
    # every frame the page sent is in the engine
    wait(driver, lambda d: int(d.find_element(By.ID, "status").get_attribute("data-ingested") or 0) >= 8
         and d.find_element(By.ID, "status").get_attribute("data-ingested")
         == str(d.execute_script("return page.sent")), what="frames ingested")
    return driver.execute_script("return page.sid")


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_the_page_streams_a_file_and_shows_the_servers_answers(server, video, browser, tmp_path, transport):
    url, app = server
    sid = stream_file(browser, url, video, transport)
    assert browser.find_element(By.ID, "transport").text == ("WebSocket" if transport == "ws"
                                                              else "HTTP + server-sent events")
    status = app.state.registry.get(sid).status()
    assert status["frames_ingested"] >= 8 and status["frames_rejected"] == 0 and status["frames_dropped"] == 0
    assert status["newest_frame_s"] > 2.0, "the page streamed the video's capture times"

    text = ask_in_page(browser, "What shapes do you see?", max_tokens=8)
    assert text["state"] == "done" and "TTFT" in text["meta"] and "8 tokens" in text["meta"]
    want = http_answer(url, sid, {"text": "What shapes do you see?", "max_new_tokens": 8})
    assert text["raw"] == want["text"] and want["tokens"] == 8

    choice = ask_in_page(browser, "Which shape came first?", choices="circle\nsquare\ntriangle")
    assert choice["state"] == "done"
    assert choice["best"] == http_answer(url, sid, {"text": "Which shape came first?",
                                                    "choices": ["circle", "square", "triangle"]})["best"]
    assert f"session {sid}" in browser.find_element(By.ID, "status").text
    shot = artifacts(tmp_path) / f"serve_page_{transport}.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_the_page_streams_the_webcam(server, browser, tmp_path):
    url, app = server
    browser.get(f"{url}/")
    browser.find_element(By.ID, "webcam").click()
    wait(browser, lambda d: d.find_element(By.ID, "start").is_enabled(), what="the webcam")
    browser.find_element(By.ID, "start").click()
    wait(browser, lambda d: int(d.find_element(By.ID, "status").get_attribute("data-ingested") or 0) >= 4,
         what="webcam frames ingested")
    answer = ask_in_page(browser, "What is on the camera?", max_tokens=4)
    assert answer["state"] == "done" and "4 tokens" in answer["meta"]
    browser.find_element(By.ID, "stop").click()
    shot = artifacts(tmp_path) / "serve_page_webcam.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
