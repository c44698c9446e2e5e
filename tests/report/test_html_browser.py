"""report.html in a real browser: headless Chromium (Debian's `chromium`) driven by Selenium through
Debian's `chromium-driver`. .ci/run installs both and sets DISTILL_REQUIRE_BROWSER=1, so in CI a
missing browser fails here; elsewhere these tests skip when Chromium is not installed.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from distill.report.write import build_report
from tests.report.sweeps import fixture_sweep

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


def open_browser(width: int = 1400, height: int = 1100):
    """Headless Chromium with console and network logging (Chrome DevTools 'performance' log)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def screenshot(html: Path, out: Path, width: int = 1300, height: int = 1250, cell: str | None = None) -> None:
    """A PNG of the page as the browser draws it: its top, or with `cell` the view after a click on
    that cell's row (docs/dashboard.png and docs/dashboard_cell.png are made with this)."""
    driver = open_browser(width, height)
    try:
        driver.get(html.resolve().as_uri())
        if cell is not None:
            row = next(r for r in driver.find_elements("css selector", "tr.cell-row")
                       if r.find_element("css selector", "td").text == cell)
            row.click()
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("DISTILL_REQUIRE_BROWSER"):
            pytest.fail(f"browser test required (DISTILL_REQUIRE_BROWSER=1) but {reason}")
        pytest.skip(reason)
    sweep = fixture_sweep(tmp_path_factory.mktemp("browser"))
    html = build_report(sweep)["report.html"]
    driver = open_browser()
    try:
        driver.get(html.resolve().as_uri())
        yield driver, html
    finally:
        driver.quit()


def test_page_loads_with_no_console_error_and_no_network_request(page):
    driver, html = page
    assert driver.execute_script("return typeof Plotly") == "object"
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    requests = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            requests.append(msg["params"]["request"]["url"])
    assert requests and all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    assert html.resolve().as_uri() in requests


def test_one_trace_per_objective_and_benchmark_drawn(page):
    driver, _ = page
    drawn = driver.execute_script("""
        const div = document.getElementById('rouge');
        return div.data.filter(t => t.meta.kind === 'objective').map(t => [t.meta.objective, t.meta.benchmark]);""")
    assert sorted(map(tuple, drawn)) == sorted((o, b) for o in ("fkl", "rkl", "jsd") for b in ("test", "shift_long"))
    # plotly drew them: one SVG line per objective trace, plus the reference levels
    n_paths = driver.execute_script("return document.querySelectorAll('#rouge .scatterlayer .trace .js-line').length")
    assert n_paths >= 6 + 4
    refs = driver.execute_script("""return document.getElementById('rouge').data
        .filter(t => t.meta.kind === 'reference').map(t => t.name)""")
    assert set(refs) == {"teacher", "SFT warm start"}


def test_objectives_toggle(page):
    driver, _ = page
    box = driver.find_element("css selector", "input.objective-toggle[value='rkl']")
    box.click()
    visible = driver.execute_script("""return document.getElementById('rouge').data
        .filter(t => t.meta.objective === 'rkl').map(t => t.visible)""")
    assert visible and set(visible) == {"legendonly"}
    box.click()
    visible = driver.execute_script("""return document.getElementById('rouge').data
        .filter(t => t.meta.objective === 'rkl').map(t => t.visible)""")
    assert set(visible) == {True}


def test_a_click_on_a_cell_shows_its_generations_and_curves(page):
    driver, _ = page
    row = next(r for r in driver.find_elements("css selector", "tr.cell-row")
               if r.find_element("css selector", "td").text == "fkl-tau1-s0-45807ce7")
    section = driver.find_element("id", row.get_attribute("data-cell"))
    assert not section.is_displayed()
    row.click()
    assert section.is_displayed()
    assert "The answer is 42." in section.text and "66.7" in section.text
    assert section.find_element("css selector", ".curves .main-svg").is_displayed()   # plotly drew the curves
    others = [s for s in driver.find_elements("css selector", "section.drill") if s.is_displayed()]
    assert others == [section]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
