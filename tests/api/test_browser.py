"""The draw-a-digit page in a real headless Chromium: real mouse strokes, taken from real MNIST digits,
drawn on the canvas; the page must show the digit's label. Screenshots go to the test's tmp folder
(and, with DIGITS_SAVE_SCREENSHOT=path, one is copied there: that is how docs/draw-a-digit.png is made).

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them where apt is available).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.harness import ServerThread, fixture_digits, free_port

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Debian's chromium and chromium-driver are not installed "
                "(apt-get install chromium chromium-driver, or `make test` as root)", allow_module_level=True)
from selenium import webdriver  # noqa: E402  (the dev extra)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

INK = 128  # a fixture pixel at or above this is ink
CELL = 10  # canvas pixels per MNIST pixel: the 280 px pad holds the 28 px digit


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(http_port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=760,680",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def strokes(digit: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The digit's ink as horizontal drags, one per run of ink pixels in each row, in pad pixels."""
    lines = []
    for row in range(digit.shape[0]):
        ink = np.flatnonzero(digit[row] >= INK)
        if not ink.size:
            continue
        breaks = np.flatnonzero(np.diff(ink) > 1)
        for start, end in zip(np.r_[ink[0], ink[breaks + 1]], np.r_[ink[breaks], ink[-1]], strict=True):
            y = row * CELL + CELL // 2
            lines.append((int(start) * CELL + CELL // 2, y, int(end) * CELL + CELL // 2, y))
    return lines


def draw(driver: webdriver.Chrome, digit: np.ndarray) -> None:
    """Real pointer input: press, drag along each run, release, as a person would with a mouse."""
    box = driver.execute_script(
        "const r = document.getElementById('pad').getBoundingClientRect();"
        "return [r.left, r.top, r.width / document.getElementById('pad').width];")
    left, top, scale = box
    actions = ActionBuilder(driver, duration=0)
    mouse = actions.pointer_action
    for x0, y0, x1, y1 in strokes(digit):
        mouse.move_to_location(int(left + x0 * scale), int(top + y0 * scale))
        mouse.pointer_down()
        mouse.move_to_location(int(left + x1 * scale), int(top + y1 * scale))
        mouse.pointer_up()
    actions.perform()


def answer(driver: webdriver.Chrome) -> str:
    """The digit the page shows once it has answered for everything drawn."""
    def settled(d: webdriver.Chrome) -> bool:
        state = d.execute_script("const r = document.getElementById('result');"
                                 "return [r.dataset.state, r.dataset.drawn, r.dataset.answered];")
        assert state[0] != "error", d.find_element("id", "message").text
        return bool(state[0] == "done" and state[1] == state[2])

    WebDriverWait(driver, 20, poll_frequency=0.05).until(settled)
    return str(driver.find_element("id", "digit").text)


def test_drawn_real_digits_are_recognised(server: ServerThread, browser: webdriver.Chrome,
                                          tmp_path: Path) -> None:
    images, labels = fixture_digits()
    # The first fixture digit of each of five classes: chosen by position, not by how well they do.
    picks = [int(np.flatnonzero(labels == label)[0]) for label in (0, 2, 3, 7, 9)]
    browser.get(f"http://127.0.0.1:{server.server.http_port}/")
    assert browser.find_element("id", "digit").text == "?"
    shots = []
    for index in picks:
        browser.find_element("id", "clear").click()
        assert browser.find_element("id", "result").get_attribute("data-state") == "empty"
        draw(browser, images[index])
        shown = answer(browser)
        browser.execute_script("window.scrollTo(0, 0)")
        shots.append(tmp_path / f"drawn-{index}-label-{labels[index]}.png")
        assert browser.save_screenshot(str(shots[-1]))
        assert shown == str(labels[index]), f"drew fixture digit {index} (a {labels[index]}), page shows {shown}"
        bars = browser.execute_script(
            "return [...document.querySelectorAll('.bar')].map(b => parseFloat(b.style.height));")
        assert len(bars) == 10 and int(np.argmax(bars)) == labels[index]
        assert abs(sum(bars) - 100) < 1.0  # the chart shows the probabilities, in percent
    ActionChains(browser).click(browser.find_element("id", "clear")).perform()
    assert browser.find_element("id", "digit").text == "?"
    target = os.environ.get("DIGITS_SAVE_SCREENSHOT")
    if target:
        shutil.copyfile(shots[0], target)


def test_the_page_says_not_sure_instead_of_a_big_digit(browser: webdriver.Chrome) -> None:
    """A prediction the server does not accept is shown as its reason, not as a digit. The server's
    uncertain threshold is set above any confidence, so that every drawing is `uncertain`."""
    images, labels = fixture_digits()
    with ServerThread(http_port=free_port(), reject_uncertain_below=1.01) as strict:
        browser.get(f"http://127.0.0.1:{strict.server.http_port}/")
        draw(browser, images[0])
        assert answer(browser) == "not sure"
        assert browser.find_element("id", "result").get_attribute("data-verdict") == "uncertain"
        assert browser.find_element("id", "confidence").text.startswith(f"maybe {labels[0]} (")
