"""The store viewer attacked with realistic stores and requests (docs/view.md; test_hostile_view.py
had the command line's address errors): class names Plotly reads as numbers, picture requests for
sets that are no pictures, searches from a clip without a vector or after a failed one, a vector of
zeros, a box selection over search rings, a redraw that fails, an unlabelled split, clips appended
while the app runs.

HTTP checks go through urllib (as test_view.py); only what runs in the page's script uses Debian's
chromium through Playwright (skipped, saying why, where either is missing).
"""
from __future__ import annotations

import html
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the viewer's [view] extra (starlette, uvicorn, plotly) is not installed")

from featurestore.datasets import read_tau  # noqa: E402
from featurestore.store import open_store  # noqa: E402
from tests.featurestore.test_view import EMBED, LOGMEL, build_view_store, fetch, make_view_dataset  # noqa: E402

from tests.featurestore.test_view_browser import BROWSER_ARGS, CHROMIUM, select_whole_map  # noqa: E402

#: the demo's ten classes renamed to numbers, in an order that is not numeric (a dataset whose
#: classes are ids, as UrbanSound8K's classID)
NUMERIC = ["10", "2", "30", "4", "50", "6", "70", "8", "90", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_view_dataset(tmp_path_factory.mktemp("hostile_viewer") / "demo")


def numeric_manifest(dataset: Path) -> Any:
    """The demo manifest with every class renamed to a number (`NUMERIC`)."""
    manifest = read_tau(dataset)
    renamed = dict(zip(manifest.classes, NUMERIC))
    manifest.classes = [renamed[c] for c in manifest.classes]
    for clip in manifest.clips:
        clip.label = renamed[clip.label]
    return manifest


@pytest.fixture
def chromium_page():
    """A Playwright page in Debian's chromium (software WebGL), or a skip saying what is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the [test] extra) is not installed")
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


#: the tick labels of one axis of the confusion matrix, in the order they are drawn on the page
TICKS = """([axis, side]) => [...document.querySelectorAll('#confusion .' + axis + ' text')]
  .map((t) => [t.getBoundingClientRect()[side], t.textContent]).sort((a, b) => a[0] - b[0]).map((t) => t[1])"""
CELL = """([t, p]) => {
  const gd = document.getElementById('confusion'), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
  const box = gd.getBoundingClientRect();
  return { x: box.left + xa._offset + xa.l2p(p), y: box.top + ya._offset + ya.l2p(t), types: [xa.type, ya.type] };
}"""


def test_classes_named_by_numbers_keep_their_confusion_matrix_cells(tmp_path, dataset, chromium_page):
    """Classes "10", "2", "30", ...: Plotly guessed a numeric axis from the tick values, so the matrix
    was drawn on axes ticked -40..40 with each row at its class's number, and a click on a cell
    listed no clips (the clicked value, a number, was no class name). Category axes always."""
    from featurestore.viewer import start

    page = chromium_page
    path = build_view_store(tmp_path / "n.zarr", dataset, manifest=numeric_manifest(dataset))
    running = start(path)
    try:
        page.goto(running.url)
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function("document.body.dataset.confusion")
        split = page.input_value("#split")
        cm = json.loads(fetch(running.url + "api/confusion?" + urlencode({"source": "run:a01", "split": split}))[1])
        assert cm["classes"] == NUMERIC
        assert page.evaluate(TICKS, ["ytick", "top"]) == NUMERIC  # true classes top to bottom, in store order
        assert page.evaluate(TICKS, ["xtick", "left"]) == NUMERIC  # predicted classes left to right
        mistakes = [tuple(map(int, k.split(","))) for k in cm["cells"] if k.split(",")[0] != k.split(",")[1]]
        t, p = mistakes[0]
        page.locator("#confusion").scroll_into_view_if_needed()
        cell = page.evaluate(CELL, [t, p])
        assert cell["types"] == ["category", "category"]
        page.mouse.move(cell["x"], cell["y"])
        page.mouse.click(cell["x"], cell["y"])
        page.locator("#cell-clips li").first.wait_for()
        assert page.locator("#cell-clips li a").all_inner_texts() == cm["cells"][f"{t},{p}"]
        assert page.locator("#cell-name").inner_text() == f"(true {NUMERIC[t]}, predicted {NUMERIC[p]})"
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server(dataset, tmp_path_factory):
    from featurestore.viewer import start

    running = start(build_view_store(tmp_path_factory.mktemp("hostile_viewer_store") / "s.zarr", dataset))
    yield running
    running.stop()


@pytest.mark.parametrize("feature_set", ["frames/16", EMBED, "", "nope"])
def test_a_log_mel_picture_of_a_set_that_is_no_log_mel_is_a_404_naming_the_log_mel_sets(server, feature_set):
    """``logmel.png?set=frames/16`` was a 500 from Pillow ('Cannot handle this data type'), an embedding
    set a 400 'axis 1 is out of bounds for array of dimension 1': neither named the set."""
    clip = server.state.store.clip_ids[2]
    status, body, kind = fetch(server.url + "logmel.png?" + urlencode({"id": clip, "set": feature_set}))
    text = body.decode()
    assert (status, kind.split(";")[0]) == (404, "text/plain"), text
    assert text == f"no log-mel set named {feature_set!r}; the store has: logmel." + text.split("logmel.", 1)[1]
    assert "\n" not in text.strip()


def test_the_log_mel_picture_is_the_clips_own_spectrogram(server):
    """The picture asked for each clip is made from that clip's stored segments (not another row's)."""
    from PIL import Image

    from featurestore.viewer.images import logmel_image

    store = server.state.store
    for clip in (store.clip_ids[0], store.clip_ids[-1]):
        status, body, kind = fetch(server.url + "logmel.png?" + urlencode({"id": clip, "set": "logmel"}))
        assert (status, kind) == (200, "image/png")
        shown = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
        np.testing.assert_array_equal(shown, logmel_image(store.get("logmel", clip)))
        assert shown.shape[1] == store.feature_info("logmel").n_segments * LOGMEL[1]


#: a decoder's error text, as extraction records it for a clip that failed (its vector is not there)
FAILED = '<img src=x onerror="window.pwned=1">moov atom not found'


@pytest.fixture(scope="module")
def partial(dataset, tmp_path_factory):
    """A store whose embedding set lacks one clip (extraction failed on it): (running app, that clip)."""
    from featurestore.viewer import start

    path = build_view_store(tmp_path_factory.mktemp("hostile_viewer_partial") / "p.zarr", dataset)
    with open_store(path, "a") as store:
        failed = store.clip_ids[5]
        store.set_errors(EMBED, {failed: FAILED})
    running = start(path)
    yield running, failed
    running.stop()


def test_searching_from_a_clip_without_a_vector_says_so(partial):
    """It answered that clip itself with a similarity of 1.000 and nothing else: a search that
    looked as if it had worked and found no neighbour. Now one line naming the clip and the set."""
    running, failed = partial
    status, body, kind = fetch(running.url + "api/search?" + urlencode({"q": failed, "k": 5}))
    assert (status, kind.split(";")[0]) == (400, "text/plain"), body[:300]
    assert body.decode() == (f"feature set {EMBED!r} has not been computed for clip(s) {failed} "
                             f"(done flag is false; run extraction for them first)")
    other = running.state.store.clip_ids[6]  # a clip with its vector: itself, then search's neighbours
    found = json.loads(fetch(running.url + "api/search?" + urlencode({"q": other, "k": 4}))[1])
    near = running.state.store.search(EMBED, other, k=3, method="exact").clip_ids
    assert [r["clip_id"] for r in found["results"]] == [other, *near] and failed not in near


def test_a_failed_search_leaves_no_earlier_results_on_the_page(partial, chromium_page):
    """The results list and the ringed points of the previous query stayed under a query that failed
    (only the note changed): the page listed hits for a query they do not answer."""
    running, failed = partial
    page = chromium_page
    page.goto(running.url)
    page.wait_for_selector("body[data-ready='1']")
    other = running.state.store.clip_ids[6]
    page.fill("#search", other)
    page.click("#search-go")
    page.locator("#results li a").first.wait_for()
    assert page.locator("#results li a").all_inner_texts()[0] == other
    page.fill("#search", failed)
    page.click("#search-go")
    page.wait_for_function("document.getElementById('note').textContent.length > 0")
    assert page.locator("#note").inner_text().startswith(f"feature set {EMBED!r} has not been computed for clip(s) {failed}")
    assert page.locator("#results li").count() == 0
    assert page.evaluate("document.getElementById('map').data.filter((t) => t.name === 'search').length") == 0
    assert page.evaluate("window.pwned") is None


def test_a_redraw_that_fails_says_so_and_leaves_no_stale_picture(tmp_path, dataset, chromium_page):
    """A menu choice whose data cannot be read (here the store deleted under the app: a 503) left the
    last matrix, its accuracy and the last map under the new choice, with no word of the error
    (the failed redraw's rejection went nowhere). Now the note says why and the old picture is gone."""
    from featurestore.viewer import start

    page = chromium_page
    path = build_view_store(tmp_path / "d.zarr", dataset)
    running = start(path)
    try:
        page.goto(running.url)
        page.wait_for_selector("body[data-ready='1']")
        # the first matrix is on held-out clips (before: on fold1_train, the last split alphabetically)
        assert page.evaluate("document.body.dataset.confusion") == "run:a01|fold1_evaluate"
        assert re.match(r"\d+ clips, accuracy ", page.locator("#accuracy").inner_text())
        shutil.rmtree(path)
        gone = f"the store {path} was deleted or replaced while featurestore view runs ("
        page.select_option("#split", "fold1_train")
        page.wait_for_function("document.getElementById('note').textContent.length > 0", timeout=10_000)
        assert page.locator("#note").inner_text().startswith(gone)
        assert page.locator("#accuracy").inner_text() == "" and page.evaluate("document.body.dataset.confusion") is None
        assert page.locator("#confusion .ytick").count() == 0  # no matrix of another split under fold1_train
        page.select_option("#colour", "predicted:run:a01")
        page.wait_for_function("document.body.dataset.map === undefined", timeout=10_000)
        assert page.locator("#note").inner_text().startswith(gone)
        assert page.locator("#map .legendtext").count() == 0  # no label legend under "predicted"
    finally:
        running.stop()


def test_a_clip_whose_vector_is_all_zeros_still_has_its_page(tmp_path, dataset):
    """A clip whose embedding is all zeros (no direction: search refuses it) made its whole clip page
    a 400 line, its audio, frames and predictions out of reach. Now the page is shown and its
    neighbours section says why there are none."""
    from featurestore.viewer import start

    path = build_view_store(tmp_path / "z.zarr", dataset)
    with open_store(path, "a") as store:
        vectors = store.read_rows(EMBED, 0, store.n_clips)
        vectors[3] = 0
        store.write_rows(EMBED, 0, vectors)
        zero, other = store.clip_ids[3], store.clip_ids[0]
    running = start(path)
    try:
        status, body, _ = fetch(running.url + "clip?" + urlencode({"id": zero}))
        page = body.decode()
        assert status == 200, page[:300]
        assert re.search(r'<h1 id="clip-id">([^<]*)</h1>', page).group(1) == zero
        assert '<audio id="audio"' in page and "id='outputs'" in page
        note = html.unescape(re.search(r"<p class='note' id='neighbours-note'>([^<]*)</p>", page).group(1))
        assert note.startswith(f"clip {zero!r} in feature set {EMBED!r} is all zeros")
        page = fetch(running.url + "clip?" + urlencode({"id": other}))[1].decode()  # the others keep theirs
        listed = [html.unescape(c) for c in re.findall(r"<a href='clip\?id=([^&']*)", page)]
        assert listed == running.state.store.search(EMBED, other, k=8, method="exact").clip_ids
    finally:
        running.stop()


def test_a_box_selection_over_search_hits_lists_each_clip_once(server, chromium_page):
    """The rings of a search are points of their own trace: a box over them listed every ringed clip
    twice under "Selected on the map" (its class's point and its ring)."""
    page = chromium_page
    store = server.state.store
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#search", store.clip_ids[0])
    page.click("#search-go")
    page.wait_for_function("document.querySelectorAll('#results li').length > 0")
    ringed = page.evaluate("document.getElementById('map').data.find((t) => t.name === 'search').customdata.length")
    assert ringed == store.n_clips  # 20 hits by default: every clip of the demo is ringed
    select_whole_map(page)
    assert sorted(page.locator("#selection li a").all_inner_texts()) == sorted(store.clip_ids)


def test_search_hits_follow_the_map_they_were_found_on(tmp_path, dataset, chromium_page):
    """After a search, another colouring dropped the rings but kept the list, and another feature set
    kept the list of the old set's neighbours under the new set's map. Now a recolouring rings the
    same hits again and another set clears them."""
    from featurestore.viewer import start

    path = build_view_store(tmp_path / "two.zarr", dataset)
    with open_store(path, "a") as store:
        info = store.feature_info(EMBED)
        store.create_feature_set("clip/other", info.n_segments, (8,), {**info.provenance, "encoder": "clip/other@none:3"})
        store.write_rows("clip/other", 0, np.random.default_rng(5).normal(size=(store.n_clips, info.n_segments, 8)).astype(np.float16))
        clip = store.clip_ids[2]
    running = start(path)
    page = chromium_page
    ringed = "(document.getElementById('map').data.find((t) => t.name === 'search') || {customdata: null}).customdata"
    try:
        page.goto(running.url)
        page.wait_for_selector("body[data-ready='1']")
        assert page.input_value("#set") == EMBED
        page.fill("#search", clip)
        page.click("#search-go")
        page.wait_for_function("document.querySelectorAll('#results li').length > 0")
        hits = page.locator("#results li a").all_inner_texts()
        assert hits[0] == clip and list(page.evaluate(ringed)) == hits
        page.select_option("#colour", "city")
        page.wait_for_function("(want) => document.body.dataset.map === want", arg=f"{EMBED}|city")
        assert page.locator("#results li a").all_inner_texts() == hits and list(page.evaluate(ringed)) == hits
        page.select_option("#set", "clip/other")
        page.wait_for_function("(want) => document.body.dataset.map === want", arg="clip/other|city")
        assert page.locator("#results li").count() == 0 and page.evaluate(ringed) is None
    finally:
        running.stop()


def test_a_split_without_labelled_clips_has_no_accuracy(tmp_path, dataset, chromium_page):
    """An unlabelled evaluation split (DCASE's evaluation set has no labels) answered "0 clips,
    accuracy 0.0%": the accuracy of no clip read as every clip wrong. Now it is null, and 0 clips."""
    from featurestore.viewer import start

    manifest = read_tau(dataset)
    for clip in manifest.clips:
        clip.label = None if "fold1_evaluate" in clip.splits else clip.label
    path = build_view_store(tmp_path / "u.zarr", dataset, manifest=manifest)
    running = start(path)
    try:
        cm = json.loads(fetch(running.url + "api/confusion?" + urlencode({"source": "run:a01", "split": "fold1_evaluate"}))[1])
        assert (cm["n"], cm["accuracy"], cm["cells"]) == (0, None, {})
        assert np.asarray(cm["counts"]).sum() == 0
        labelled = json.loads(fetch(running.url + "api/confusion?" + urlencode({"source": "run:a01", "split": "fold1_train"}))[1])
        counts = np.asarray(labelled["counts"])
        assert labelled["n"] == counts.sum() > 0 and labelled["accuracy"] == pytest.approx(np.trace(counts) / counts.sum())
        page = chromium_page
        page.goto(running.url)
        page.wait_for_selector("body[data-ready='1']")
        page.select_option("#split", "fold1_evaluate")
        page.wait_for_function("document.body.dataset.confusion === 'run:a01|fold1_evaluate'")
        assert page.locator("#accuracy").inner_text() == "no clip with a label in this split: no accuracy"
    finally:
        running.stop()


def test_a_clip_appended_after_the_start_is_a_404_that_says_to_restart(tmp_path, dataset):
    """The app shows the store as it was when it started. A clip appended since was answered "is not
    in the store; nearest ids ...", which the store contradicts; the line now says clips were added
    and that a restart shows them. The clips it had keep their pages."""
    from featurestore.viewer import start

    path = build_view_store(tmp_path / "a.zarr", dataset)
    more = tmp_path / "more"
    shutil.copytree(dataset, more)
    added = read_tau(more)
    added.clips = added.clips[:3]
    for clip in added.clips:
        clip.clip_id += "_b"
    running = start(path)
    try:
        with open_store(path, "a") as store:
            store.append_clips(added)
        new = added.clips[0].clip_id
        for target in ["clip?" + urlencode({"id": new}), "media?" + urlencode({"id": new, "kind": "audio"})]:
            status, body, _ = fetch(running.url + target)
            assert status == 404 and body.decode().endswith(
                " (the store now holds 23 clips, 3 added since featurestore view started with 20: restart it to see them)"), body
        status, body, _ = fetch(running.url + "clip?" + urlencode({"id": "nope"}))
        assert status == 404 and "restart" in body.decode()
        assert fetch(running.url + "clip?" + urlencode({"id": running.state.store.clip_ids[0]}))[0] == 200
    finally:
        running.stop()
