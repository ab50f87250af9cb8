"""The HTML pages in a real browser: Debian's headless Chromium, driven by selenium. The run
report and the interactive attention view open from a file with no console errors, draw
non-blank content, and the view answers a hover with the token pair and its weight (a
decoder-only model's causal map too)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tformer
from tformer.generation import Seq2Seq
from tformer.tokenization import train_tokenizer
from tformer.visualization import attention_maps
from tformer.visualization.viewer import write_attention_html

from .test_sft import tiny_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian chromium, chromium-driver; "
           "`make install` installs them)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1600"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> list[dict]:
    """Load ``path``; returns the console messages logged while it loaded."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")
    return driver.get_log("browser")


def distinct_colours(png: Path) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.int32)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


def painted_canvases(driver) -> list[int]:
    """Per canvas on the page, how many of its pixels are not white."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('canvas')).map(function (c) {
          var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;
          for (var i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] < 750) n++;
          return n; });""")


def test_report_opens_without_console_errors_and_is_not_blank(browser, reference_run, tmp_path):
    broken = tmp_path / "broken.html"  # the control: an error on a page is seen
    broken.write_text("<!DOCTYPE html><script>null.x;</script>", encoding="utf-8")
    assert any(m["level"] == "SEVERE" for m in open_page(browser, broken))

    report = reference_run / "report.html"  # written by train() at the end of the run
    assert report.is_file()
    errors = [m for m in open_page(browser, report) if m["level"] == "SEVERE"]
    assert errors == []
    assert browser.title.startswith("tformer report")
    browser.save_screenshot(str(tmp_path / "top.png"))
    assert distinct_colours(tmp_path / "top.png") > 100  # text, tables, charts
    assert len(browser.find_elements("css selector", "svg polyline")) >= 4  # the curves
    canvases = painted_canvases(browser)
    assert len(canvases) == 3 and min(canvases) > 1000  # three attention viewers, drawn
    browser.execute_script("document.getElementById('attention').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "attention.png"))
    assert distinct_colours(tmp_path / "attention.png") > 50


def test_report_of_a_run_with_nothing_but_its_config(browser, reference_run, tmp_path):
    from tformer.visualization.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference_run / "config.yaml", run / "config.yaml")
    errors = [m for m in open_page(browser, write_report(run)) if m["level"] == "SEVERE"]
    assert errors == []
    missing = browser.find_elements("css selector", ".missing")
    assert len(missing) >= 4 and all("not available" in m.text for m in missing)


def test_attention_view_answers_hover_with_the_pair_and_weight(browser, reference_run, tmp_path):
    from selenium.webdriver.support.ui import Select

    checkpoint = sorted((reference_run / "checkpoints").glob("step-*"))[-1]
    maps = attention_maps(tformer.load(checkpoint, device="cpu"), "Zwei Hunde spielen 中文.",
                          "Two dogs play.")
    page = write_attention_html(maps, tmp_path / "attention.html")
    assert [m for m in open_page(browser, page) if m["level"] == "SEVERE"] == []
    kind, layer, head = (Select(browser.find_element("css selector", f".tf-{name}"))
                         for name in ("kind", "layer", "head"))
    assert [o.get_attribute("value") for o in kind.options] == ["cross", "encoder", "decoder"]
    assert len(layer.options) == 2 + 1 and len(head.options) == 4 + 1  # and the means
    assert painted_canvases(browser)[0] > 1000

    T, S = len(maps.target_tokens), len(maps.source_tokens)
    sizes = (T, S)
    expected = maps.cross[-1].mean(axis=0)[2, 3]  # default: last layer, mean of heads
    text = hover(browser, sizes, 2, 3)
    assert text.startswith(f"{maps.target_tokens[2]} (3) → {maps.source_tokens[3]} (4): ")
    assert abs(float(text.rsplit(": ", 1)[1]) - expected) < 1e-4

    kind.select_by_value("encoder")
    layer.select_by_value("0")
    head.select_by_value("1")
    sizes = (S, S)
    text = hover(browser, sizes, 1, 0)
    assert text.startswith(f"{maps.source_tokens[1]} (2) → {maps.source_tokens[0]} (1): ")
    assert abs(float(text.rsplit(": ", 1)[1]) - maps.encoder[0][1, 1, 0]) < 1e-4


def hover(browser, sizes: tuple[int, int], i: int, j: int) -> str:
    """Move the mouse over cell (row i, column j) of the drawn map of ``sizes`` (rows,
    columns); the hover line."""
    return browser.execute_script("""
        var c = document.querySelector('canvas'), r = c.getBoundingClientRect();
        var rows = arguments[0], cols = arguments[1];
        var cell = Math.max(6, Math.min(28, Math.floor(640 / Math.max(rows, cols))));
        c.dispatchEvent(new MouseEvent('mousemove', {bubbles: true,
          clientX: r.left + 110 + (arguments[3] + 0.5) * cell,
          clientY: r.top + 110 + (arguments[2] + 0.5) * cell}));
        return document.querySelector('.tf-hover').textContent;""", *sizes, i, j)


def test_attention_view_of_a_copy_model_shows_its_copy_attention_and_p_copy(
        browser, reference_run, tmp_path):
    from selenium.webdriver.support.ui import Select

    from .serving_helpers import served_checkpoint

    model = tformer.load(served_checkpoint(reference_run, tmp_path / "copy", copy_attention=True),
                         device="cpu")
    maps = attention_maps(model, "Zwei Hunde spielen.", "Two dogs play.")
    page = write_attention_html(maps, tmp_path / "attention.html")
    assert [m for m in open_page(browser, page) if m["level"] == "SEVERE"] == []
    kind = Select(browser.find_element("css selector", ".tf-kind"))
    assert [o.get_attribute("value") for o in kind.options] == ["cross", "encoder", "decoder",
                                                                 "copy"]
    kind.select_by_value("copy")
    T, S = len(maps.target_tokens), len(maps.source_tokens)
    text = hover(browser, (T, S), 2, 3)
    pair, p_copy = text.split("; P(copy) of ")
    assert pair.startswith(f"{maps.target_tokens[2]} (3) → {maps.source_tokens[3]} (4): ")
    assert abs(float(pair.rsplit(": ", 1)[1]) - maps.copy_attention[2, 3]) < 1e-4
    assert p_copy.startswith(f"{maps.target_tokens[2]}: ")
    assert abs(float(p_copy.rsplit(": ", 1)[1]) - (1 - maps.p_gen[2])) < 1e-4


def test_attention_view_of_a_decoder_only_model_shows_its_causal_map(browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    tokenizer = train_tokenizer(["the cat sat on the mat"], kind="char", append_eos=False)
    model = Seq2Seq(tiny_model(len(tokenizer)), tokenizer)
    maps = attention_maps(model, "the cat", " sat on the mat")
    page = write_attention_html(maps, tmp_path / "attention.html")
    assert [m for m in open_page(browser, page) if m["level"] == "SEVERE"] == []
    kind = Select(browser.find_element("css selector", ".tf-kind"))
    assert [(o.get_attribute("value"), o.text) for o in kind.options] == [
        ("decoder", "causal self-attention (token read × token read)")]
    assert painted_canvases(browser)[0] > 1000
    T = len(maps.target_tokens)
    text = hover(browser, (T, T), 9, 4)
    assert text.startswith(f"{maps.target_tokens[9]} (10) → {maps.target_tokens[4]} (5): ")
    assert abs(float(text.rsplit(": ", 1)[1]) - maps.decoder[-1].mean(axis=0)[9, 4]) < 1e-4
    assert hover(browser, (T, T), 4, 9).endswith(": 0.0000")  # a later token: never seen
