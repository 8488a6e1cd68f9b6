"""The explorer's compare page: decoder cosine for runs fitted on one store, behaviour matching (and
saying so) for runs fitted on different stores. Data: the explorer tests' tiny world."""

from __future__ import annotations

import numpy as np
import pytest
from test_explore_fixtures import N_ATOMS, tiny_world

import vitatlas
from vitatlas import ActivationStore
from vitatlas.explore import Explorer
from vitatlas.explore.matching import BEHAVIOUR, DECODER, choose_matching


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.fixture(scope="module")
def elsewhere(world, tmp_path_factory):
    """A run fitted on another store of the same model, layer and tokens (a copy of the world's store in
    another directory), with its cards made on the world's store."""
    import shutil

    root = tmp_path_factory.mktemp("elsewhere")
    store = ActivationStore(world.store_path)
    copy = ActivationStore(shutil.copytree(world.store_path, root / "copy"))
    run = vitatlas.DBKSVD(n_atoms=N_ATOMS, k=3, epochs=2, seed=1).fit(copy, progress=False).save(root / "other")
    cards = root / "cards"
    vitatlas.interpret(vitatlas.load(run), store, top=4, progress=False, run_path=run).save(cards, progress=False)
    return run, cards


def test_runs_of_one_store_are_matched_by_decoder_cosine(world):
    explorer = Explorer.open(world.runs, world.store_path, cards=world.cards, progress=False)
    data = explorer.compare()
    assert data["matching"]["kind"] == DECODER and "same store" in data["matching"]["why"]
    assert all("cosine" in p for p in data["pairs"])


def test_runs_of_different_stores_are_matched_by_behaviour(world, elsewhere):
    run, cards = elsewhere
    explorer = Explorer.open([world.runs[0], run], world.store_path, cards=[world.cards[0], cards], progress=False)
    a, b = (explorer.runs[n].dictionary for n in explorer.run_names)
    assert choose_matching(a, b) == (BEHAVIOUR, "the runs were fitted on different stores")
    data = explorer.compare()
    m = data["matching"]
    assert m["kind"] == BEHAVIOUR and "Pearson" in m["score"] and m["units"] == "tokens"
    assert len(data["pairs"]) == N_ATOMS and data["cosine_histogram"] is None
    scores = [p["score"] for p in data["pairs"] if p["score"] is not None]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert 0 <= data["shared_fraction_a"] <= 1 and data["null_threshold"] > 0
    assert sum(data["null_histogram"]["counts"]) > 0
    # the atom page shows no decoder-cosine match for runs it cannot compare that way
    assert "match" not in explorer.atom(None, 0)
    tested = [p for p in data["pairs"] if p["b"] is not None]
    assert tested and all(isinstance(p["b"], int) and "b_label" in p for p in tested)
    assert np.isfinite([p["correlation"] for p in tested]).all()


def test_the_compare_page_says_it_matches_by_behaviour(world, elsewhere, tmp_path):
    """The page itself (static export, headless Chromium): the matching line and the shared column."""
    import test_explore_browser as browser

    if not (browser.CHROMIUM and browser.CHROMEDRIVER):
        pytest.skip("no Chromium/chromedriver: run `bash scripts/install_browser.sh`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from vitatlas.explore import export_site

    run, cards = elsewhere
    explorer = Explorer.open([world.runs[0], run], world.store_path, cards=[world.cards[0], cards], progress=False)
    index = export_site(explorer, tmp_path / "site", max_images=0, progress=False)
    options = webdriver.ChromeOptions()
    options.binary_location = browser.CHROMIUM
    # the profile in tmp_path: Chromium's default one would stay behind in the temporary directory
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=browser.CHROMEDRIVER))
    driver.screenshot_dir = tmp_path / "screenshots"  # where screenshot_on_failure saves
    try:
        driver.set_page_load_timeout(browser.WAIT)
        with browser.screenshot_on_failure(driver, "compare-behaviour"):
            driver.get((index.parent / "compare.html").resolve().as_uri())
            browser.wait_ready(driver)
            text = driver.find_element("id", "matching").text
            assert "by behaviour" in text and "fitted on different stores" in text and "shuffled" in text
            headers = [th.text for th in driver.find_elements("css selector", "#pairs thead th")]
            assert headers[0] == "|r|" and headers[-1] == "shared"
            assert len(driver.find_elements("css selector", "#pairs tbody tr")) == N_ATOMS
    finally:
        driver.quit()
