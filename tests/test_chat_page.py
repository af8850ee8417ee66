"""The chat page (static/chat.html) in a real browser: headless Chromium driven by selenium
against a live server. Skipped where Debian's chromium and chromium-driver are not installed
(.ci/run installs them).

    GRAFITO_SCREENSHOT=docs/chat_page.png python -m pytest -q tests/test_chat_page.py -k screenshot
saves the README's picture (GRAFITO_SCREENSHOT_MODEL=out/cpu_tiny serves a trained model for it).
"""

import os
import time
from pathlib import Path

import pytest

from test_serve import ask, model_dir, reference, running, slowed, solo  # noqa: F401 (fixtures)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install them)")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 900, "height": 700, "deviceScaleFactor": 1, "mobile": False})
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(model_dir):  # noqa: F811
    with running(model_dir, load=slowed(0.03)) as run:  # slow enough to press stop mid-answer
        yield run


def wait_for(condition, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the page did not get there in {seconds} s")


def open_page(browser, server, temperature="0", max_tokens="12"):
    browser.get(server.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny")  # /health read, defaults filled
    for field, value in (("temperature", temperature), ("max-tokens", max_tokens)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def send(browser, text):
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def bubbles(browser, role):
    return browser.find_elements(By.CSS_SELECTOR, f"#messages .msg.{role}")


def answering(browser):
    return browser.find_element(By.ID, "stop").is_displayed()


def test_a_sent_message_streams_in_the_apis_greedy_answer(browser, page_server, reference):  # noqa: F811
    open_page(browser, page_server)
    send(browser, "what is a river")
    wait_for(lambda: answering(browser))
    wait_for(lambda: not answering(browser))
    assert [b.text for b in bubbles(browser, "user")] == ["what is a river"]
    expected = solo(reference, ask("what is a river"), 12)[0]
    assert bubbles(browser, "assistant")[0].get_attribute("textContent") == expected
    assert "tokens/s" in browser.find_element(By.ID, "speed").text


def test_stop_ends_the_answer_on_the_server_and_new_chat_starts_over(browser, page_server):
    open_page(browser, page_server, max_tokens="3000")
    send(browser, "talk for a long time")
    wait_for(lambda: bubbles(browser, "assistant") and bubbles(browser, "assistant")[0].text)
    assert page_server.health()["busy"] == 1
    browser.find_element(By.ID, "stop").click()
    page_server.wait_until(lambda h: h["busy"] == 0, seconds=5)  # 3000 tokens would take 90 s
    wait_for(lambda: browser.find_element(By.ID, "send").is_displayed())
    partial = bubbles(browser, "assistant")[0].get_attribute("textContent")
    assert partial and "stopped" in browser.find_element(By.ID, "messages").text
    browser.find_element(By.ID, "new-chat").click()
    assert not bubbles(browser, "user") and not bubbles(browser, "assistant")
    assert browser.find_element(By.ID, "empty").is_displayed()


def test_regenerate_answers_the_last_message_again(browser, page_server):
    open_page(browser, page_server)
    send(browser, "name a colour")
    wait_for(lambda: browser.find_element(By.ID, "regenerate").is_enabled())
    first = bubbles(browser, "assistant")[0].get_attribute("textContent")
    browser.find_element(By.ID, "regenerate").click()
    wait_for(lambda: answering(browser))
    wait_for(lambda: not answering(browser))
    assert [b.get_attribute("textContent") for b in bubbles(browser, "assistant")] == [first]  # greedy: the same
    assert len(bubbles(browser, "user")) == 1


def test_shift_enter_starts_a_line_and_markup_stays_text(browser, page_server):
    open_page(browser, page_server, max_tokens="2")
    box = browser.find_element(By.ID, "input")
    box.send_keys("<b>bold</b> & <img src=x onerror=alert(1)>")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("second line")
    assert not bubbles(browser, "user")  # Shift+Enter did not send
    box.send_keys(Keys.ENTER)
    wait_for(lambda: not answering(browser) and bubbles(browser, "assistant"))
    user = bubbles(browser, "user")[0]
    assert user.get_attribute("textContent") == "<b>bold</b> & <img src=x onerror=alert(1)>\nsecond line"
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages b, #messages img")


def test_errors_are_shown_and_the_message_waits_in_the_box(browser, model_dir):  # noqa: F811
    with running(model_dir, api_key="page-key") as keyed:
        open_page(browser, keyed)
        send(browser, "hello")
        error = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .error"))
        assert "API key" in error[0].text
        assert browser.find_element(By.ID, "input").get_attribute("value") == "hello" and not bubbles(browser, "user")
        browser.find_element(By.ID, "api-key").send_keys("page-key")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: bubbles(browser, "assistant") and not answering(browser))
        assert bubbles(browser, "assistant")[0].get_attribute("textContent")


def test_a_long_conversation_scrolls_and_says_when_old_turns_are_dropped(browser, model_dir):  # noqa: F811
    with running(model_dir) as quick:
        open_page(browser, quick, max_tokens="30")
        for i in range(6):
            send(browser, f"question {i}, asked with a few more words")
            wait_for(lambda: len(bubbles(browser, "assistant")) == i + 1 and not answering(browser))
        assert "oldest" in browser.find_element(By.ID, "messages").text
        scroll = browser.execute_script("const m = document.getElementById('messages');"
                                        "return [m.scrollHeight, m.clientHeight, m.scrollTop];")
        assert scroll[0] > scroll[1] and scroll[2] + scroll[1] >= scroll[0] - 2  # overflowing, at the bottom


def test_screenshot_of_a_conversation(browser, model_dir, tmp_path):  # noqa: F811
    target = Path(os.environ.get("GRAFITO_SCREENSHOT") or tmp_path / "chat_page.png")
    served = os.environ.get("GRAFITO_SCREENSHOT_MODEL") or model_dir
    with running(served) as shown:
        browser.get(shown.url + "/")
        wait_for(lambda: browser.find_element(By.ID, "model").text not in ("connecting…", "model loading…"))
        for count, question in enumerate(("what is 2+2", "how can i make a videogame"), start=1):
            send(browser, question)
            wait_for(lambda: not answering(browser) and len(bubbles(browser, "assistant")) == count, seconds=60)
        target.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
