"""The web page of ``tformer serve`` in headless Chromium (Debian's chromium and chromedriver,
driven by selenium): type a text, click Generate, read the output (equal to
`Seq2Seq.generate` with the same options; greedy answers stream from /v1/completions, and the
text grows on the page token by token), see the cross-attention heatmap drawn (and, for a
model with copy attention, its copy attention and P(copy) column), and no error in the
browser's console."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

import tformer
from tformer.serving import ServerThread, ServeSettings, create_app

from .serving_helpers import served_checkpoint, source_texts, wordy

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)

NEW = 8


@pytest.fixture(scope="module")
def seq2seq(reference_run, tmp_path_factory) -> tformer.Seq2Seq:
    return tformer.load(served_checkpoint(reference_run, tmp_path_factory.mktemp("served")),
                        device="cpu")


@pytest.fixture(scope="module")
def text(seq2seq, data_files) -> str:
    """A source whose greedy and beam outputs are non-empty printable text: what the page shows
    can then be compared with what generate() returns."""
    for candidate in source_texts(data_files):
        outputs = [seq2seq.generate(candidate, max_new_tokens=NEW, num_beams=b) for b in (1, 3)]
        if all(o.strip() and o.isprintable() for o in outputs):
            return candidate
    pytest.fail("no source with a printable output")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _generate_on_page(driver, url: str, text: str, num_beams: int, key: str = "") -> str:
    """Fill the form, click Generate, wait until the page is done; the final state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    if key:
        driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "text").send_keys(text)
    for field, value in (("num-beams", num_beams), ("max-new-tokens", NEW)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
        in ("done", "error"))
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _painted_pixels(driver) -> int:
    """Pixels of the heatmap canvas that are not white."""
    return driver.execute_script("""
        const c = document.getElementById('heatmap');
        if (!c.width || !c.height) return 0;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++;
        return n;""")


def test_page_generates_and_draws_the_cross_attention(browser, seq2seq, text):
    from selenium.webdriver.common.by import By

    with ServerThread(create_app(seq2seq, settings=ServeSettings())) as server:
        results = []
        for beams in (1, 3):
            state = _generate_on_page(browser, server.url, text, beams)
            shown = browser.execute_script("return document.getElementById('output').textContent")
            cells = int(browser.find_element(By.ID, "heatmap").get_attribute("data-cells"))
            results.append((state, shown, cells, _painted_pixels(browser)))
        logs = browser.get_log("browser")
    for (state, shown, cells, painted), beams in zip(results, (1, 3)):
        assert state == "done", browser.find_element(By.ID, "status").text
        assert shown == seq2seq.generate(text, max_new_tokens=NEW, num_beams=beams)
        maps = _cross_shape(seq2seq, text, shown)
        assert cells == maps[0] * maps[1] > 0
        assert painted > 0
    assert [entry for entry in logs if entry["level"] == "SEVERE"] == []
    assert browser.find_element(By.ID, "heatmap").get_attribute("data-copy-column") == "0"


def test_page_shows_copy_attention_and_p_copy(browser, reference_run, tmp_path, text):
    """A model with copy attention: the heatmap gets a P(copy) column, and "copy attention"
    among the layers redraws it with the copy attention, which differs from the last layer's
    cross-attention."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    copy_model = tformer.load(served_checkpoint(reference_run, tmp_path / "copy",
                                                copy_attention=True), device="cpu")
    with ServerThread(create_app(copy_model, settings=ServeSettings())) as server:
        state = _generate_on_page(browser, server.url, text, 1)
        heatmap = browser.find_element(By.ID, "heatmap")
        column, cross = heatmap.get_attribute("data-copy-column"), _pixels(browser)
        layers = Select(browser.find_element(By.ID, "layer"))
        layers.select_by_value("copy")
        copy, cells = _pixels(browser), int(heatmap.get_attribute("data-cells"))
        head_disabled = not browser.find_element(By.ID, "head").is_enabled()
        logs = browser.get_log("browser")
    assert state == "done", browser.find_element(By.ID, "status").text
    shown = copy_model.generate(text, max_new_tokens=NEW)
    assert column == "1" and head_disabled
    rows, columns = _cross_shape(copy_model, text, shown)
    assert cells == rows * columns > 0
    assert copy != cross  # another matrix drawn
    assert [entry for entry in logs if entry["level"] == "SEVERE"] == []


def _pixels(driver) -> str:
    """The heatmap canvas as a PNG data URL: two drawings compare equal only if identical."""
    return driver.execute_script("return document.getElementById('heatmap').toDataURL()")


def test_page_sends_the_api_key(browser, seq2seq, text):
    from selenium.webdriver.common.by import By

    settings = ServeSettings(api_key="page-key")
    with ServerThread(create_app(seq2seq, settings=settings)) as server:
        refused = _generate_on_page(browser, server.url, text, 1, key="wrong")
        message = browser.find_element(By.ID, "status").text
        accepted = _generate_on_page(browser, server.url, text, 1, key="page-key")
        shown = browser.execute_script("return document.getElementById('output').textContent")
    assert refused == "error" and "API key" in message
    assert accepted == "done" and shown == seq2seq.generate(text, max_new_tokens=NEW)
    assert _painted_pixels(browser) > 0


def _cross_shape(seq2seq, source: str, target: str) -> tuple[int, int]:
    """(T, S) of the cross-attention the page should draw."""
    from tformer.visualization.attention import attention_maps

    maps = attention_maps(seq2seq, source, target)
    return tuple(maps.cross[-1].shape[1:])


def test_page_streams_the_answer_token_by_token(browser, seq2seq, data_files):
    """A 64-token answer (end-of-sequence switched off) grows on the page as it is decoded: the
    output's text, read each time the page changes it, takes many lengths before the last, and
    the last equals the non-streamed answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(seq2seq, settings=ServeSettings())
    app.state.batcher.eos_ids = set()
    with ServerThread(app) as server:
        prompt = wordy(server.url, source_texts(data_files))[0]
        expected = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 64, "temperature": 0}).json()["choices"][0]["text"]
        browser.get(server.url + "/")
        browser.execute_script("""
            const output = document.getElementById('output');
            window.lengths = [];
            new MutationObserver(() => window.lengths.push(output.textContent.length))
              .observe(output, {childList: true, characterData: true, subtree: true});""")
        browser.find_element(By.ID, "text").send_keys(prompt)
        box = browser.find_element(By.ID, "max-new-tokens")
        box.clear()
        box.send_keys("64")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
            in ("done", "error"))
        lengths = browser.execute_script("return window.lengths")
        shown = browser.execute_script("return document.getElementById('output').textContent")
        meta = browser.find_element(By.ID, "meta").text
        logs = browser.get_log("browser")
    assert shown == expected and "streamed" in meta
    grown = sorted({n for n in lengths if n})
    assert len(grown) > 1 and grown[-1] == len(expected), lengths  # more than one DOM update
    assert [entry for entry in logs if entry["level"] == "SEVERE"] == []
