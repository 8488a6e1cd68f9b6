"""End-to-end tests of the explorer in a real headless Chromium (Debian's chromium + chromium-driver).

A uvicorn server runs the app on a free local port in a thread; Selenium drives the system browser
through /usr/bin/chromedriver (given explicitly, so Selenium Manager never downloads anything). The
tests skip, with the reason, only when no Chromium or chromedriver is installed
(``bash scripts/install_browser.sh`` installs them). On failure a screenshot is saved and its path is
put in the failure message.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import pytest
from test_explore_fixtures import first_image, tiny_world

CHROMIUM = os.environ.get("VITATLAS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("VITATLAS_CHROMEDRIVER") or shutil.which("chromedriver") or \
    ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium/chromedriver: run `bash scripts/install_browser.sh` (apt: chromium chromium-driver) or set "
           "VITATLAS_CHROMIUM and VITATLAS_CHROMEDRIVER")

WAIT = 20  # seconds: generous for a busy shared machine; a passing test returns as soon as the page is ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.fixture(scope="module")
def explorer(world):
    from vitatlas.explore import Explorer

    return Explorer.open(world.runs, world.store_path, cards=world.cards, model=world.model_spec, probe=world.probe,
                         progress=False)


@pytest.fixture(scope="module")
def base_url(explorer):
    import uvicorn

    from vitatlas.explore.server import create_app, local_hosts

    port = free_port()
    app = create_app(explorer, allowed_hosts=local_hosts("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + WAIT
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # the browser's profile and the failure screenshots live in pytest's basetemp, not in the temporary
    # directory: chromedriver's own profile directory stays behind when the browser is not quit cleanly
    base = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--disable-extensions", "--no-first-run",
                f"--user-data-dir={base / 'profile'}"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    d.screenshot_dir = base / "screenshots"  # where screenshot_on_failure saves
    d.set_page_load_timeout(WAIT)
    yield d
    d.quit()


@contextmanager
def screenshot_on_failure(driver, name: str):
    try:
        yield
    except BaseException as exc:
        driver.screenshot_dir.mkdir(parents=True, exist_ok=True)
        path = driver.screenshot_dir / f"{name}-{int(time.time())}.png"
        try:
            driver.save_screenshot(str(path))
            where = f"screenshot: {path}; page {driver.current_url}"
        except Exception as shot_exc:  # the browser itself may be what failed
            where = f"no screenshot ({type(shot_exc).__name__})"
        message = " ".join(str(exc).split("Stacktrace:")[0].split())  # selenium appends a native stack
        raise AssertionError(f"{type(exc).__name__}: {message} [{where}]") from exc


def wait_ready(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready"))
    state = driver.find_element("tag name", "body").get_attribute("data-ready")
    if state != "1":
        errors = driver.find_elements("id", "error")
        raise AssertionError(f"page failed: {errors[0].text if errors else state}")


def wait_until(driver, check, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT, poll_frequency=0.05).until(lambda d: check(d), message)


def row_ids(driver) -> list[int]:
    # read in one script: the table may be re-rendered between two element look-ups
    return driver.execute_script("return [...document.querySelectorAll('#atom-rows tr')].map(t => +t.dataset.atom);")


def images_loaded(driver, css: str) -> bool:
    return driver.execute_script(
        "const imgs=[...document.querySelectorAll(arguments[0])];"
        "return imgs.length>0 && imgs.every(i=>i.complete && i.naturalWidth>0);", css)


# ---- the tests ----------------------------------------------------------------------------------------------

def test_table_sorts_and_opens_an_atom_whose_images_load(driver, base_url, explorer):
    with screenshot_on_failure(driver, "table"):
        driver.get(base_url)
        wait_ready(driver)
        assert row_ids(driver) == list(range(24))
        driver.find_element("css selector", 'th[data-sort="frequency"]').click()   # most frequent first
        freq = [a["frequency"] or 0 for a in explorer.runs["ksvd"].cards.atoms]
        expected = sorted(range(24), key=lambda i: (-freq[i], i))
        wait_until(driver, lambda d: row_ids(d) == expected, f"rows not sorted by frequency: {row_ids(driver)}")
        assert "sort=-frequency" in driver.current_url
        driver.find_element("css selector", 'th[data-sort="frequency"]').click()   # and back, ascending
        wait_until(driver, lambda d: row_ids(d) == sorted(range(24), key=lambda i: (freq[i], i)), "ascending sort")
        # thumbnails load lazily: the rows on screen have decoded theirs
        wait_until(driver, lambda d: images_loaded(d, "#atom-rows tr:nth-child(-n+3) img.thumb"), "thumbnails")

        first = row_ids(driver)[0]
        driver.find_element("css selector", f'#atom-rows tr[data-atom="{first}"] a.atom-link').click()
        wait_ready(driver)
        assert driver.find_element("id", "atom-title").text.startswith(f"Atom #{first}")
        wait_until(driver, lambda d: images_loaded(d, "#top-images img"), "top images did not load")
        n_top = len(explorer.runs["ksvd"].cards.atoms[first]["top_images"])
        assert len(driver.find_elements("css selector", "#top-images .tile")) == n_top
        assert driver.find_element("id", "match-cosine").text  # the other run's best match, with its cosine
        toggle = driver.find_element("id", "heat-toggle")
        toggle.click()
        assert not toggle.is_selected()


def test_search_box_filters_the_table(driver, base_url):
    from selenium.webdriver.common.keys import Keys

    with screenshot_on_failure(driver, "search"):
        driver.get(base_url + "?run=sae")
        wait_ready(driver)
        box = driver.find_element("id", "search")
        box.send_keys("#17", Keys.ENTER)
        wait_until(driver, lambda d: row_ids(d) == [17], f"search did not find atom 17: {row_ids(driver)}")
        assert driver.find_element("id", "total").text == "1 atoms"


def test_click_a_patch_lists_its_atoms_linking_to_atom_pages(driver, base_url, explorer):
    from selenium.webdriver.common.action_chains import ActionChains

    image = first_image(explorer)
    with screenshot_on_failure(driver, "patch"):
        driver.get(f"{base_url}image.html?run=ksvd&id={image}")
        wait_ready(driver)
        wait_until(driver, lambda d: images_loaded(d, "#the-image"), "the image did not load")
        grid = driver.find_element("id", "patch-grid")
        # patch 5 of the 4x4 grid: column 1, row 1 (the canvas is 448 px: 112 px per cell)
        ActionChains(driver).move_to_element_with_offset(grid, -224 + 112 + 56, -224 + 112 + 56).click().perform()
        wait_until(driver, lambda d: "1 selected patch" in d.find_element("id", "active-title").text,
                   "clicking a patch did not select it")
        data = explorer.image("ksvd", image)
        expected = [a for a, _ in data["tokens"][5]["atoms"]]
        shown = driver.execute_script(
            "return [...document.querySelectorAll('#active-atoms li[data-atom]')].map(l => +l.dataset.atom);")
        assert sorted(shown) == sorted(expected) and shown
        link = driver.find_element("css selector", f'#active-atoms li[data-atom="{shown[0]}"] a.atom-link')
        link.click()
        wait_ready(driver)
        assert driver.find_element("id", "atom-title").text.startswith(f"Atom #{shown[0]}")


def test_moving_a_slider_changes_the_prediction(driver, base_url, explorer):
    from selenium.webdriver.common.keys import Keys

    image = first_image(explorer)
    with screenshot_on_failure(driver, "slider"):
        driver.get(f"{base_url}image.html?run=ksvd&id={image}")
        wait_ready(driver)
        driver.find_element("css selector", "#active-atoms li[data-atom] button.add-edit").click()
        slider = driver.find_element("css selector", "#edits input.slider")
        prediction = driver.find_element("id", "prediction")
        slider.send_keys(Keys.HOME)   # -10 x max activation: fires an input event like a drag
        wait_until(driver, lambda d: "after:" in prediction.text,
                   f"no prediction after moving the slider: {prediction.text!r}")
        low = prediction.text
        slider.send_keys(Keys.END)    # +10 x max activation
        wait_until(driver, lambda d: "after:" in prediction.text and prediction.text != low,
                   f"the prediction text did not change: {prediction.text!r}")
        assert driver.find_elements("css selector", "#class-bars .bar.after")


def test_compare_page(driver, base_url):
    with screenshot_on_failure(driver, "compare"):
        driver.get(base_url + "compare.html")
        wait_ready(driver)
        assert len(driver.find_elements("css selector", "#pairs tbody tr")) == 24
        assert "explained_variance" in driver.find_element("id", "metrics").text


def test_static_export_opens_from_disk(driver, explorer, tmp_path):
    from vitatlas.explore import export_site

    index = export_site(explorer, tmp_path / "site", progress=False)
    with screenshot_on_failure(driver, "export"):
        driver.get(index.resolve().as_uri() + "?sort=-kappa")
        wait_ready(driver)
        kappa = [a["labels"][0]["kappa"] if a.get("labels") else None for a in explorer.runs["ksvd"].cards.atoms]
        shown = row_ids(driver)
        assert len(shown) == 24 and kappa[shown[0]] == max(k for k in kappa if k is not None)
        driver.find_element("css selector", f'#atom-rows tr[data-atom="{shown[0]}"] a.atom-link').click()
        wait_ready(driver)
        wait_until(driver, lambda d: images_loaded(d, "#top-images img"), "exported images did not load")
        driver.find_element("css selector", "#top-images .tile a").click()   # an image page, exported too
        wait_ready(driver)
        assert "static export" in driver.find_element("id", "intervention").text
