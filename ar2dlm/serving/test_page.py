"""The live page at /: served as it is, and, where a Chromium is installed, loaded in a real headless browser that
races a prompt and sees both answers stream in, coloured by forward, with their statistics.

Install the browser with `apt-get install chromium chromium-driver` (Debian's packages; selenium drives the
system browser and never downloads one). Without them the browser test skips and says so.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from ar2dlm.serving.conftest import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_the_page_is_served_as_plain_html(tiny_dlm):
    with serving(tiny_dlm) as (server, _):
        page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for part in ('id="prompt"', 'id="go"', 'id="ar"', 'id="dlm"', "/v1/chat/completions", '{policy: "ar"}'):
        assert part in page.text, part


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no Chromium: apt-get install chromium chromium-driver to run the page in a browser")
def test_the_page_races_a_prompt_in_a_real_browser(tiny_dlm, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    with serving(tiny_dlm) as (server, _):
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        try:
            driver.get(f"{server.url}/")
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "tiny-dlm")
            driver.find_element(By.ID, "max").clear()
            driver.find_element(By.ID, "max").send_keys("12")
            driver.find_element(By.ID, "go").click()
            # both answers done: the button is enabled again and each pane shows its final statistics
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "go").is_enabled() and all(
                d.find_element(By.CSS_SELECTOR, f"#{p} .stats").text.startswith("12") for p in ("ar", "dlm")))
            ar_spans = driver.find_elements(By.CSS_SELECTOR, "#ar .answer span")
            dlm_spans = driver.find_elements(By.CSS_SELECTOR, "#dlm .answer span")
            assert ar_spans and dlm_spans, driver.page_source
            assert not driver.find_elements(By.CSS_SELECTOR, ".error")
            # one token a forward on the left (TPF 1.00); the dLM commits several in some forward
            assert all(s.get_attribute("title").endswith(": 1 token") for s in ar_spans)
            assert "1.00" in driver.find_element(By.CSS_SELECTOR, "#ar .stats").text
            assert any(s.get_attribute("class") == "wide" for s in dlm_spans)
            for spans in (ar_spans, dlm_spans):  # one colour per forward
                colours = {s.get_attribute("title").split(":")[0]: s.value_of_css_property("background-color")
                           for s in spans}
                assert len(set(colours.values())) == len(colours), colours
            driver.save_screenshot(str(tmp_path / "page.png"))
        finally:
            driver.quit()
