"""The search page in a real browser: headless Chromium types a query, and the result photos load.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped, saying so,
where they are absent.
"""

import io
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from dualencoder.apps import index as index_app
from dualencoder.apps.query import PhotoSearch
from dualencoder.apps.serve import HOST, make_server, serve
from tests.apps_helpers import save_tiny_app_model, write_photos

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="no headless browser: apt-get install chromium chromium-driver")
WAIT_S = 20


def wait_for_new_page(driver, old_element, status_text: str):
    """Wait until a click's navigation has replaced the page and its status says `status_text`.

    A form submit or a link click loads a new page: an element found on the old page goes stale
    in between, so wait for that first, and read the new status ignoring a stale read mid-load.
    """
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(expected_conditions.staleness_of(old_element))
    WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: status_text in d.find_element(By.ID, "status").text)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    model_dir = save_tiny_app_model(tmp_path_factory.mktemp("model"))
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, {"red.png": "red", "blue.jpg": "blue", "green.webp": "green", "more/yellow.png": "yellow"})
    index_dir = folder.parent / "photos.index"
    index_app.main(["--model_dir", model_dir, "--images", str(folder), "--index_dir", str(index_dir), "--quiet"])
    server = make_server(PhotoSearch(index_dir), port=0)
    thread = threading.Thread(target=serve, args=(server, 120), daemon=True)  # stops by itself at the latest
    thread.start()
    yield f"http://{HOST}:{server.server_address[1]}/"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def test_typing_a_query_shows_the_result_photos(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server_url)
    assert "4 photos indexed" in browser.find_element(By.ID, "status").text
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("a red square")
    count = browser.find_element(By.ID, "k")
    count.clear()
    count.send_keys("3")
    old_status = browser.find_element(By.ID, "status")
    browser.find_element(By.ID, "search").click()
    wait_for_new_page(browser, old_status, "a red square")
    images = browser.find_elements(By.CSS_SELECTOR, ".hits img")
    assert len(images) == 3
    WebDriverWait(browser, WAIT_S).until(
        lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im) for im in images))
    assert all(browser.execute_script("return arguments[0].naturalWidth", im) == 40 for im in images)  # photos are 40 px

    png = browser.get_screenshot_as_png()
    (tmp_path / "search.png").write_bytes(png)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert shot.shape[0] > 100 and shot.shape[1] > 100
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # not blank: text, form and photos
    # The photos are drawn: a result photo's colour (red, blue, green or yellow at full saturation) is on screen.
    saturated = (shot.max(axis=2).astype(int) - shot.min(axis=2)) > 120
    assert saturated.sum() > 3 * 40 * 20


def test_clicking_a_photo_finds_photos_like_it(server_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(server_url + "?q=blue&k=2")
    old_status = browser.find_element(By.ID, "status")
    browser.find_elements(By.CSS_SELECTOR, ".hits a")[0].click()
    wait_for_new_page(browser, old_status, "Photos like")
    first = browser.find_elements(By.CSS_SELECTOR, ".hits figcaption")[0].text
    assert first.startswith("1.000")  # the clicked photo itself comes first
