"""`omnitransfer serve`'s page in a real headless Chromium (Debian's chromium + chromium-driver, through
selenium): upload a real clip and first frame, pick the task, generate, read the output back; then a corrupt
upload shows its message on the page and the next generation still works.

Without Chromium here the test is skipped with the reason printed (`make browser` installs it as root);
CI installs it. OMNITRANSFER_SCREENSHOTS=DIR also keeps the page's screenshot there (docs/images/ has it).
"""

import os
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from omnitransfer.pipeline import OmniTransferPipeline
from omnitransfer.video import video_info
from omnitransfer.web import Page, launch, sample_examples, server_folder

SAMPLES = Path(__file__).parents[1] / "samples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
WAIT = 120  # seconds for a page change (a generation on the 2-core machine takes a few)


@pytest.fixture
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("the browser part was not run: no chromium and chromedriver here (`make browser` as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with server_folder() as root:
        app = launch(Page(OmniTransferPipeline.from_pretrained(), root), port=port, examples=sample_examples(),
                     block=False)  # fmt: skip
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            app.close()


def test_the_page_generates_in_a_browser_and_a_corrupt_upload_shows_its_message(browser, url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)

    def find(css: str):
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, css))

    def upload(css: str, path: Path) -> None:
        find(f"{css} input[type=file]").send_keys(str(path))

    def generated(previous: str | None = None) -> str:
        """Click generate and wait for an output other than ``previous``; its URL."""
        browser.find_element(By.ID, "generate").click()

        def output(d):
            videos = d.find_elements(By.CSS_SELECTOR, "#output video[src]")
            src = videos[0].get_attribute("src") if videos else None
            return src if src and src != previous else None

        return wait.until(output)

    browser.get(url)
    upload("#reference-1", SAMPLES / "camera_ref1.mp4")
    find("#reference-1 video")
    task = find("#task-1 input")
    task.click()
    task.send_keys("camera")
    options = wait.until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if "camera" in o.text])
    options[0].click()
    upload("#first-frame", SAMPLES / "camera_ref1.jpg")
    find("#first-frame img")
    find("#prompt textarea").send_keys("the camera pans across a city street")
    [b for b in browser.find_elements(By.TAG_NAME, "button") if "advanced settings" in b.text][0].click()
    for name, value in (("frames", "9"), ("width", "96"), ("steps", "4")):
        field = find(f"#{name} input")
        field.clear()
        field.send_keys(value + Keys.TAB)

    first = generated()
    video = tmp_path / "output.mp4"
    urllib.request.urlretrieve(first, video)
    assert video_info(video)[:3] == (9, 64, 96)  # the requested frames and size
    assert "done: 9 frames, 96x64" in find("#status").text
    screenshots = os.environ.get("OMNITRANSFER_SCREENSHOTS")
    for folder in [tmp_path, *([Path(screenshots)] if screenshots else [])]:
        folder.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(folder / "serve.png"))

    # a corrupt video: its message on the page, no traceback, and the page still generates
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    find("#reference-1 button[aria-label=Clear]").click()
    upload("#reference-1", corrupt)
    browser.find_element(By.ID, "generate").click()
    message = "reference 1 (broken.mp4): cannot decode video"
    wait.until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    find("#reference-1 button[aria-label=Clear]").click()
    upload("#reference-1", SAMPLES / "camera_ref1.mp4")
    find("#reference-1 video")
    second = generated(previous=first)
    urllib.request.urlretrieve(second, video)
    assert second != first and video_info(video)[:3] == (9, 64, 96)
