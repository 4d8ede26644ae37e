"""The viewer in a real browser: Debian's chromium driven by Playwright (no downloaded browser).

One walk through the app on the demo store: the map draws, a box selection lists its clips, hovering
a point shows its id, a click on it opens that clip's page
(its id, an audio element as long as the WAV, the frames, the run's probabilities as
``get_predictions`` has them), a text search finds the clip holding that sentence's embedding, and
a click on a confusion-matrix cell lists its clips. Then Plotly's own zoom, pan and lasso (the
axis ranges and the selection they give), and the store's hostile names shown as text, not markup.
Screenshots go to the test's tmp folder (on failure too). Skipped, saying why, when /usr/bin/chromium
or the playwright package is missing; ``.ci/run`` installs chromium.

One store, one app and one browser per module: building the store imports torch and builds the
smallest CLIP text tower (ViT-S-32-alt, random weights), most of this file's time.
"""
from __future__ import annotations

import json
from urllib.parse import urlencode
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytest.importorskip("starlette", reason="the viewer's [view] extra (starlette, uvicorn, plotly) is not installed")
pytest.importorskip("playwright.sync_api", reason="playwright (the [test] extra) is not installed")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install chromium; .ci/run does)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

from featurestore.store import open_store  # noqa: E402
from tests.featurestore.test_view import (HOSTILE, RUN, build_view_store, fetch, hostile_manifest,  # noqa: E402
                                         make_view_dataset)

TEXT = "a busy tram"
#: WebGL through SwiftShader (software): headless chromium has no GPU here.
BROWSER_ARGS = ["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox"]
WAIT_MS = 30_000

ISOLATED_POINT = """() => {
  const gd = document.getElementById('map'), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
  const box = gd.getBoundingClientRect(), pts = [];
  gd.data.forEach((t) => t.x.forEach((x, i) => pts.push([xa._offset + xa.l2p(x), ya._offset + ya.l2p(t.y[i]), t.customdata[i]])));
  let best = null, far = -1;
  for (const p of pts) {
    const d = Math.min(...pts.filter((q) => q !== p).map((q) => Math.hypot(p[0] - q[0], p[1] - q[1])));
    if (d > far) { far = d; best = p; }
  }
  return { x: box.left + best[0], y: box.top + best[1], id: best[2] };
}"""

PLOT_AREA = """() => {
  const gd = document.getElementById('map'), s = gd._fullLayout._size, box = gd.getBoundingClientRect();
  return { left: box.left + s.l, top: box.top + s.t, right: box.left + s.l + s.w, bottom: box.top + s.t + s.h };
}"""

CELL = """([t, p]) => {
  const gd = document.getElementById('confusion'), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
  const box = gd.getBoundingClientRect();
  return { x: box.left + xa._offset + xa.l2p(p), y: box.top + ya._offset + ya.l2p(t) };
}"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from featurestore.viewer import start

    dataset = make_view_dataset(tmp_path_factory.mktemp("browser_dataset") / "demo")
    path = build_view_store(tmp_path_factory.mktemp("browser") / "view.zarr", dataset, text=TEXT,
                            manifest=hostile_manifest(dataset))  # a class, a city and a split named with markup
    running = start(path)
    yield running, path, dataset
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    yield tab
    if not tab.is_closed():
        tab.screenshot(path=str(tmp_path / "last.png"), full_page=True)  # what the page showed at the end (or failure)
    context.close()


def test_map_click_clip_page_search_and_confusion_in_chromium(app, page, tmp_path):
    import soundfile

    running, path, dataset = app
    elsewhere = []  # every script, stylesheet and request must come from the app itself (no CDN)
    page.on("request", lambda request: None if request.url.startswith(running.url) else elsewhere.append(request.url))
    page.goto(running.url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#map .scatterlayer, #map canvas").count() > 0
    page.screenshot(path=str(tmp_path / "map.png"))

    select_whole_map(page)  # a box selection over the whole plot lists every clip on the map
    with open_store(path) as store:
        assert sorted(page.locator("#selection li a").all_inner_texts()) == sorted(store.clip_ids)
    page.evaluate("Plotly.relayout('map', {dragmode: 'zoom', selections: []})")  # the box would take the hover

    point = page.evaluate(ISOLATED_POINT)
    page.mouse.move(point["x"], point["y"])
    page.wait_for_selector("#map .hovertext")  # hovering shows the clip id
    assert point["id"] in page.locator("#map .hovertext").first.text_content()
    page.mouse.click(point["x"], point["y"])
    page.wait_for_url("**/clip?*")
    clip = point["id"]
    assert page.locator("#clip-id").inner_text() == clip
    with open_store(path) as store:
        row = store.row(clip)
        wav = dataset / str(store.column("audio_path")[row])
        probs = store.get_predictions(RUN, [clip])[0].mean(0)
        classes, n_frames = store.classes, store.feature_info("frames/16").n_segments
    page.wait_for_function("document.getElementById('audio').readyState >= 1")
    assert page.evaluate("document.getElementById('audio').duration") == pytest.approx(soundfile.info(str(wav)).duration, abs=1e-3)
    page.wait_for_function("document.getElementById('frames').complete")
    assert page.evaluate("document.getElementById('frames').naturalWidth") == n_frames * 16
    shown = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll("td[data-source='run:a01']")]
                                   .map((td) => [td.dataset.class, parseFloat(td.dataset.value)]))""")
    np.testing.assert_array_equal(np.array([shown[c] for c in classes], dtype=np.float32), probs.astype(np.float32))
    page.screenshot(path=str(tmp_path / "clip.png"), full_page=True)

    page.goto(running.url)
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#search", TEXT)
    page.click("#search-go")
    first = page.locator("#results li a").first
    first.wait_for()
    with open_store(path) as store:
        tram = store.clip_ids[int(np.flatnonzero(np.asarray(store.labels) == store.classes.index("tram"))[0])]
    assert first.inner_text() == tram
    ringed = page.evaluate("document.getElementById('map').data.find((t) => t.name === 'search').customdata")
    assert list(ringed) == page.locator("#results li a").all_inner_texts()  # the hits, ringed on the map

    cm = json.loads(fetch(running.url + "api/confusion?" + urlencode({"source": "run:a01", "split": page.input_value("#split")}))[1])
    t, p = next(map(int, k.split(",")) for k in cm["cells"] if k.split(",")[0] != k.split(",")[1])  # a mistake
    page.locator("#confusion").scroll_into_view_if_needed()
    cell = page.evaluate(CELL, [t, p])
    page.mouse.move(cell["x"], cell["y"])
    page.mouse.click(cell["x"], cell["y"])
    page.locator("#cell-clips li").first.wait_for()
    assert page.locator("#cell-clips li a").all_inner_texts() == cm["cells"][f"{t},{p}"]
    page.screenshot(path=str(tmp_path / "map-search-confusion.png"), full_page=True)
    assert elsewhere == []


RELAYOUTS = """() => { window.relayouts = []; document.getElementById('map').on('plotly_relayout', (e) => window.relayouts.push(e)); }"""
TO_DATA = """([px, py]) => {
  const gd = document.getElementById('map'), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
  return [xa.p2l(px - box.left - xa._offset), ya.p2l(py - box.top - ya._offset)];
}"""
#: the clips drawn left of the page x coordinate ``cut`` (the lasso's expected selection) and a cut
#: in the widest gap between points near the plot's middle, so no point sits on the lasso's edge
LEFT_OF = """(cut) => {
  const gd = document.getElementById('map'), xa = gd._fullLayout.xaxis, box = gd.getBoundingClientRect(), out = [];
  gd.data.forEach((t) => t.x.forEach((x, i) => { if (box.left + xa._offset + xa.l2p(x) < cut) out.push(t.customdata[i]); }));
  return out;
}"""
GAP = """([lo, hi]) => {
  const gd = document.getElementById('map'), xa = gd._fullLayout.xaxis, box = gd.getBoundingClientRect();
  const xs = gd.data.flatMap((t) => Array.from(t.x, (x) => box.left + xa._offset + xa.l2p(x))).filter((x) => x > lo && x < hi).sort((a, b) => a - b);
  let best = [lo, xs[0]];
  for (let i = 1; i < xs.length; i++) if (xs[i] - xs[i - 1] > best[1] - best[0]) best = [xs[i - 1], xs[i]];
  return (best[0] + best[1]) / 2;
}"""


def select_whole_map(page) -> None:
    """A box selection dragged over the whole map's plot area, waited for until the list fills."""
    box = page.evaluate(PLOT_AREA)
    page.evaluate("Plotly.relayout('map', {dragmode: 'select'})")
    page.mouse.move(box["left"] + 2, box["top"] + 2)
    page.mouse.down()
    page.mouse.move(box["right"] - 2, box["bottom"] - 2, steps=8)
    page.mouse.up()
    page.wait_for_function("document.querySelectorAll('#selection li').length > 0")


def _drag(page, start, end, steps=10):
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()


def test_zoom_pan_and_lasso_give_plotlys_ranges_and_selection(app, page):
    running, path, _ = app
    page.goto(running.url)
    page.wait_for_selector("body[data-ready='1']")
    page.evaluate(RELAYOUTS)
    box = page.evaluate(PLOT_AREA)
    w, h = box["right"] - box["left"], box["bottom"] - box["top"]
    corner0, corner1 = (box["left"] + 0.2 * w, box["top"] + 0.25 * h), (box["left"] + 0.7 * w, box["top"] + 0.8 * h)
    (x0, y0), (x1, y1) = page.evaluate(TO_DATA, list(corner0)), page.evaluate(TO_DATA, list(corner1))
    _drag(page, corner0, corner1)  # zoom (the default drag mode): the axes become the box
    page.wait_for_function("window.relayouts.length > 0")
    zoomed = page.evaluate("window.relayouts.at(-1)")
    tolerance = 2 * (x1 - x0) / (0.5 * w)  # two pixels in data units
    assert zoomed["xaxis.range[0]"] == pytest.approx(x0, abs=tolerance) and zoomed["xaxis.range[1]"] == pytest.approx(x1, abs=tolerance)
    assert sorted([zoomed["yaxis.range[0]"], zoomed["yaxis.range[1]"]]) == pytest.approx(sorted([y0, y1]), abs=tolerance * h / w * 4)
    page.evaluate("Plotly.relayout('map', {dragmode: 'pan'})")
    before = page.evaluate("document.getElementById('map')._fullLayout.xaxis.range.slice()")
    centre = (box["left"] + w / 2, box["top"] + h / 2)
    _drag(page, centre, (centre[0] + 100, centre[1]))  # pan right by 100 px: the range moves left by 100 px of data
    page.wait_for_function("window.relayouts.length > 2")
    after = page.evaluate("document.getElementById('map')._fullLayout.xaxis.range.slice()")
    per_px = (before[1] - before[0]) / w
    assert after[1] - after[0] == pytest.approx(before[1] - before[0], rel=1e-6)
    assert after[0] - before[0] == pytest.approx(-100 * per_px, abs=3 * per_px)
    page.evaluate("Plotly.relayout('map', {'xaxis.autorange': true, 'yaxis.autorange': true, dragmode: 'lasso'})")
    cut = page.evaluate(GAP, [box["left"] + 0.35 * w, box["left"] + 0.65 * w])
    expected = page.evaluate(LEFT_OF, cut)
    assert 0 < len(expected) < 20
    page.mouse.move(box["left"] + 2, box["top"] + 2)  # a lasso around everything left of the cut
    page.mouse.down()
    for x, y in [(cut, box["top"] + 2), (cut, box["bottom"] - 2), (box["left"] + 2, box["bottom"] - 2), (box["left"] + 2, box["top"] + 4)]:
        page.mouse.move(x, y, steps=6)
    page.mouse.up()
    page.wait_for_function("document.querySelectorAll('#selection li').length > 0")
    assert sorted(page.locator("#selection li a").all_inner_texts()) == sorted(expected)


def test_the_stores_names_are_shown_as_text_never_as_markup(app, page):
    running, path, _ = app
    page.goto(running.url)
    page.wait_for_selector("body[data-ready='1']")
    legend = page.locator("#map .legendtext").all_text_contents()
    assert any(text.startswith("bus" + HOSTILE + " (") for text in legend), legend
    ticks = page.locator("#confusion .ytick text").all_text_contents()
    assert "bus" + HOSTILE in ticks, ticks
    page.select_option("#colour", "city")
    page.wait_for_function("document.body.dataset.map.endsWith('|city')")
    assert "city" + HOSTILE + " (1)" in page.locator("#map .legendtext").all_text_contents()
    assert "split" + HOSTILE in page.locator("#split option").all_text_contents()
    assert page.locator("a[href*='evil'], img[src='x']").count() == 0 and page.evaluate("window.pwned") is None
    with open_store(path) as store:
        clip = store.clip_ids[0]
    page.goto(running.url + f"clip?id={clip}")
    assert page.locator("#meta-city").inner_text() == "city" + HOSTILE
    assert page.locator("a[href*='evil'], img[src='x']").count() == 0 and page.evaluate("window.pwned") is None
