"""Benchmark ``featurestore view``: clip page server time, the 100k projection, first map render, idle memory.

Stores (built once into ``--workdir``, seeded):
  * demo: the synthetic demo dataset (real WAV/MP4, 2 s clips, 20 clips), a 512-d embedding set, a
    log-mel set, stored frames and one prediction run written directly (no encoder runs);
  * big: ``--clips`` (default 100,000) clips without media, one ``[1, 512]`` float16 embedding per
    clip (clustered like real embeddings: class centre + location offset + noise) and one prediction run.

Measured in one run (the app runs in this process on a free port, requests go through HTTP):
  1. clip page: server time of ``GET /clip?id=...`` (the whole HTML page: index fields, media checks,
     every run's probabilities, 8 nearest neighbours), median and p95 over ``--pages`` random clips
     after one warm-up page (which builds search's clip matrix). Floor <= 300 ms on both stores.
  2. projection: the big set's exact PCA (numpy, float32 blocks) through ``featurestore.viewer.projection.project`` (read the store,
     clip vectors, PCA) beside scikit-learn's PCA alone on the same in-memory vectors (the ratio is
     what the store read adds). Floor <= 10 s. Then a sidecar read (the next start).
  3. first render in chromium (Playwright, /usr/bin/chromium, SwiftShader WebGL): from the map page's
     navigation to ``data-ready`` (plotly.min.js parsed, 100k points fetched and drawn), and the
     map's own time (fetch points + ``Plotly.react``). Floor <= 2 s for the map once the projection exists.
  4. the plotting library: the same points in a standalone page drawn with WebGL by plotly.js (ours)
     and by BokehJS (when ``bokeh`` is installed), median time from navigation to drawn: the ratio.
  5. idle memory: resident memory (VmRSS) of a fresh interpreter with the big store open and its
     index read (labels, ids) beside one running the app on it, idle after one map request. Floor <= 1.5x.

Run:  .venv/bin/python scripts/bench/bench_view.py [--workdir /tmp/avscene-bench-view] [--clips 100000]
Exit code 1 when a floor is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store

EMBED = "clip/bench"
DIM = 512
PROV = {"encoder": "bench/synthetic", "config": {}, "weights": {"kind": "random", "seed": 0}}
FLOORS = {"clip_page_ms": 300.0, "projection_s": 10.0, "first_render_s": 2.0, "idle_memory_ratio": 1.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/avscene-bench-view")
    p.add_argument("--clips", type=int, default=100_000)
    p.add_argument("--pages", type=int, default=50)
    p.add_argument("--no-browser", action="store_true", help="skip the chromium measurements")
    p.add_argument("--parts", default="projection,pages,render,libraries,memory",
                   help="which measurements to run (comma-separated; default all)")
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ the stores
def write_run(store, labels: np.ndarray, rng: np.random.Generator, seg: int) -> None:
    n, c = len(labels), len(store.classes)
    store.create_predictions("bench", seg, {"head": "bench"})
    for start in range(0, n, 20_000):
        lab = labels[start:start + 20_000]
        logits = rng.standard_normal((len(lab), seg, c)) + 2.0 * np.eye(c)[np.maximum(lab, 0)][:, None]
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        store.write_predictions("bench", np.arange(start, start + len(lab)), probs)


def build_demo(work: Path) -> Path:
    from featurestore.datasets import read_tau
    from featurestore.demo import make_demo_dataset

    path = work / "demo.zarr"
    if (work / "demo.built").exists():
        return path
    data = make_demo_dataset(work / "demo-data", clips_per_class=2, duration=2.0, n_cities=2, seed=0, width=64,
                             height=48, fps=5, night_fraction=0.25, clips_per_location=1, progress=False)
    rng = np.random.default_rng(0)
    manifest = read_tau(data)
    with create_store(path, manifest) as store:
        n, seg = store.n_clips, manifest.audio_segments
        labels = np.asarray(store.labels, dtype=np.int64)
        store.create_feature_set(EMBED, seg, (DIM,), PROV)
        store.write_rows(EMBED, 0, (rng.standard_normal((10, DIM))[labels][:, None] + rng.standard_normal((n, seg, DIM))).astype(np.float16))
        store.create_feature_set("logmel", seg, (64, 100), {"encoder": "logmel", "config": {}, "weights": {"kind": "parameter-free"}})
        store.write_rows("logmel", 0, rng.standard_normal((n, seg, 64, 100)).astype(np.float16))
        store.create_feature_set("frames/64", manifest.video_frames, (3, 64, 64),
                                 {"encoder": "frames/64", "config": {}, "weights": {"kind": "parameter-free"}}, dtype="uint8")
        store.write_rows("frames/64", 0, rng.integers(0, 255, (n, manifest.video_frames, 3, 64, 64), dtype=np.uint8))
        write_run(store, labels, rng, seg)
    (work / "demo.built").write_text("ok")
    return path


def build_big(work: Path, n: int) -> Path:
    path = work / f"big-{n}.zarr"
    if (work / f"big-{n}.built").exists():
        return path
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    locations = (np.arange(n) // 10) % 500
    clips = [ClipRecord(f"{TAU_CLASSES[labels[i]]}-city-{locations[i]}-{i}", label=TAU_CLASSES[labels[i]], city="city",
                        location=f"city-{locations[i]}", splits=frozenset({"train" if i % 4 else "test"})) for i in range(n)]
    with create_store(path, Manifest("bench", list(TAU_CLASSES), clips)) as store:
        info = store.create_feature_set(EMBED, 1, (DIM,), PROV)
        centres, offsets = rng.standard_normal((10, DIM)), 0.7 * rng.standard_normal((500, DIM))
        block = info.chunk_clips * 16
        for start in range(0, n, block):
            stop = min(n, start + block)
            x = centres[labels[start:stop]] + offsets[locations[start:stop]] + rng.standard_normal((stop - start, DIM))
            store.write_rows(EMBED, start, x[:, None].astype(np.float16))
        write_run(store, labels.astype(np.int64), rng, 1)
    (work / f"big-{n}.built").write_text("ok")
    return path


# ---------------------------------------------------------------------------------- measurements
def get(url: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as answer:
        body = answer.read()
    return time.perf_counter() - t0, body


def ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median_ms": 1000 * statistics.median(values), "p95_ms": 1000 * values[int(0.95 * (len(values) - 1))]}


def clip_pages(path: Path, pages: int) -> dict:
    """Server time of clip pages (warm), after one warm-up page; the app's start time too."""
    from featurestore.viewer import start

    t0 = time.perf_counter()
    running = start(path)
    started = time.perf_counter() - t0
    try:
        with open_store(path) as store:
            ids = [str(c) for c in np.random.default_rng(1).choice(store.clip_ids, size=min(pages, store.n_clips), replace=False)]
        first, _ = get(running.url + f"clip?id={ids[0]}")
        times = [get(running.url + f"clip?id={c}")[0] for c in ids]
        points_s, body = get(running.url + "api/points?colour=label")
    finally:
        running.stop()
    return {"start_s": started, "first_page_ms": 1000 * first, **ms(times), "points_ms": 1000 * points_s,
            "points_mb": len(body) / 2**20}


def projection(path: Path) -> dict:
    """Our projection (read + vectors + PCA, sidecar written) vs scikit-learn's default PCA alone on the
    vectors (imported before it is timed; ours counts none: it needs no scikit-learn)."""
    from sklearn.decomposition import PCA

    from featurestore.store.search import clip_blocks
    from featurestore.viewer.projection import project, sidecar_dir

    with open_store(path) as store:
        folder = sidecar_dir(store, EMBED)
        for old in folder.glob("*") if folder and folder.exists() else []:
            old.unlink()
        t0 = time.perf_counter()
        ours = project(store, EMBED)
        ours_s = time.perf_counter() - t0
        vectors = np.concatenate([v for _, v in clip_blocks(store, EMBED)])
        t0 = time.perf_counter()
        PCA(n_components=2).fit_transform(vectors)  # scikit-learn's default (covariance_eigh here)
        sklearn_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = project(store, EMBED)
        read_s = time.perf_counter() - t0
    return {"n": len(ours.rows), "dim": int(vectors.shape[1]), "projection_s": ours_s, "sklearn_pca_s": sklearn_s,
            "ratio_vs_sklearn": ours_s / sklearn_s, "sidecar_read_s": read_s, "from_sidecar": again.seconds == 0}


def first_render(path: Path) -> dict:
    """Chromium: navigation -> map drawn, with the projection already in its sidecar."""
    from playwright.sync_api import sync_playwright

    from featurestore.viewer import start

    running = start(path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            out = {}
            for attempt in ("cold", "warm"):  # warm: plotly.min.js from the browser's cache
                t0 = time.perf_counter()
                page.goto(running.url)
                page.wait_for_selector("body[data-map]", timeout=120_000)
                out[f"{attempt}_page_s"] = time.perf_counter() - t0
                out[f"{attempt}_map_s"] = page.evaluate("window.mapRenderMs") / 1000
            browser.close()
    finally:
        running.stop()
    return out


PLOTLY_PAGE = """<!doctype html><html><body><div id="plot" style="width:1000px;height:600px"></div>
<script>{js}</script><script>
const data = {data};
const traces = data.groups.map((g, k) => ({{type: "scattergl", mode: "markers", name: g, marker: {{size: 3}},
  x: data.x.filter((_, i) => data.group[i] === k), y: data.y.filter((_, i) => data.group[i] === k)}}));
Plotly.newPlot("plot", traces, {{}}).then(() => requestAnimationFrame(() => requestAnimationFrame(() => {{
  window.renderedMs = performance.now(); }})));
</script></body></html>"""

BOKEH_PAGE = """<!doctype html><html><body><div id="plot"></div>
<script>{js}</script><script>{gl}</script><script>
Bokeh.embed.embed_item({item}, "plot").then(() => requestAnimationFrame(() => requestAnimationFrame(() => {{
  window.renderedMs = performance.now(); }})));
</script></body></html>"""


def library_pages(work: Path, n: int) -> dict[str, Path]:
    """The same ``n`` points (10 colour groups) drawn with WebGL by plotly.js and by BokehJS, each a
    standalone page with its library inline: the reference for choosing the plotting library."""
    from featurestore.viewer._deps import plotly_js

    rng = np.random.default_rng(0)
    group = np.arange(n) % 10
    xy = rng.standard_normal((n, 2)) + 4 * rng.standard_normal((10, 2))[group]
    data = {"x": xy[:, 0].round(4).tolist(), "y": xy[:, 1].round(4).tolist(), "group": group.tolist(),
            "groups": [f"g{k}" for k in range(10)]}
    pages = {"plotly": work / f"plotly-{n}.html"}
    pages["plotly"].write_text(PLOTLY_PAGE.format(js=plotly_js().read_text(), data=json.dumps(data)))
    try:
        import bokeh
        from bokeh.embed import json_item
        from bokeh.models import ColumnDataSource
        from bokeh.plotting import figure
        from bokeh.transform import factor_cmap
    except ImportError:
        return pages
    fig = figure(width=1000, height=600, output_backend="webgl", tools="pan,wheel_zoom,box_select,lasso_select,hover")
    source = ColumnDataSource({"x": xy[:, 0], "y": xy[:, 1], "g": [f"g{k}" for k in group]})
    fig.scatter("x", "y", source=source, size=3, color=factor_cmap("g", "Category10_10", data["groups"]))
    js_dir = Path(bokeh.__file__).parent / "server" / "static" / "js"
    pages["bokeh"] = work / f"bokeh-{n}.html"
    pages["bokeh"].write_text(BOKEH_PAGE.format(js=(js_dir / "bokeh.min.js").read_text(),
                                                gl=(js_dir / "bokeh-gl.min.js").read_text(), item=json.dumps(json_item(fig))))
    return pages


def library_render(work: Path, n: int, repeats: int = 3) -> dict:
    """Median ms from navigation to the points drawn (two animation frames after the library says so)."""
    from playwright.sync_api import sync_playwright

    pages = library_pages(work, n)
    out = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        for name, path in pages.items():
            times = []
            for _ in range(repeats):
                page.goto(path.as_uri())
                page.wait_for_function("window.renderedMs !== undefined", timeout=120_000)
                times.append(page.evaluate("window.renderedMs"))
            out[f"{name}_ms"] = statistics.median(times)
        browser.close()
    if "bokeh_ms" in out:
        out["plotly_vs_bokeh"] = out["plotly_ms"] / out["bokeh_ms"]
    return out


RSS = ("import json; print(json.dumps({l.split(':')[0]: int(l.split()[1]) / 1024 for l in open('/proc/self/status') "
       "if l.split(':')[0] in ('VmRSS', 'RssAnon', 'RssFile')}))")


def _rss(code: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def idle_memory(path: Path) -> dict:
    """Resident memory (MiB: VmRSS, and its anonymous and file-backed parts) of the store opened in
    Python (ids, labels and a done mask read) vs the app serving it, idle after the map was drawn, and
    after one clip page too (its neighbours memory-map search's clip matrix: file-backed pages)."""
    plain = (f"from featurestore import open_store\ns = open_store({str(path)!r})\nids = s.clip_ids\nlab = s.labels\n"
             f"d = s.done_mask({EMBED!r})\n{RSS}")
    app = (f"import urllib.request, time, gc\nfrom featurestore.viewer import start\nr = start({str(path)!r})\n"
           f"urllib.request.urlopen(r.url + 'api/points?colour=label').read()\ngc.collect(); time.sleep(1)\n{RSS}\n"
           f"urllib.request.urlopen(r.url + 'clip?id=' + r.state.store.index.ids_at([0])[0]).read()\n"
           f"gc.collect(); time.sleep(1)\n{RSS}\nr.stop()")
    store = _rss(plain)
    done = subprocess.run([sys.executable, "-c", app], capture_output=True, text=True, check=True)
    after_map, after_page = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    return {"store": store, "app_after_map": after_map, "app_after_clip_page": after_page,
            "idle_memory_ratio": after_map["VmRSS"] / store["VmRSS"],
            "after_clip_page_ratio": after_page["VmRSS"] / store["VmRSS"],
            "after_clip_page_anon_ratio": after_page["RssAnon"] / store["RssAnon"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"loadavg {open('/proc/loadavg').read().strip()}; {os.cpu_count()} cores", flush=True)
    t0 = time.perf_counter()
    demo, big = build_demo(work), build_big(work, args.clips)
    print(f"stores ready in {time.perf_counter() - t0:.1f} s", flush=True)
    parts = set(args.parts.split(",")) - ({"render", "libraries"} if args.no_browser else set())
    results: dict = {"clips": args.clips, "loadavg": open("/proc/loadavg").read().strip()}
    steps = {"projection": [("projection", lambda: projection(big))],
             "pages": [("clip_page_demo", lambda: clip_pages(demo, args.pages)), ("clip_page_big", lambda: clip_pages(big, args.pages))],
             "render": [("render_big", lambda: first_render(big))],
             "libraries": [("libraries", lambda: library_render(work, args.clips))],
             "memory": [("memory_big", lambda: idle_memory(big))]}
    for part, runs in steps.items():
        for name, run in runs if part in parts else []:
            results[name] = run()
            print(f"{name} {json.dumps(results[name])}", flush=True)
    nan = float("nan")
    checks = [("clip_page_ms demo", results.get("clip_page_demo", {}).get("median_ms", nan)),
              ("clip_page_ms big", results.get("clip_page_big", {}).get("median_ms", nan)),
              ("projection_s", results.get("projection", {}).get("projection_s", nan)),
              ("first_render_s", results.get("render_big", {}).get("warm_map_s", nan)),
              ("idle_memory_ratio", results.get("memory_big", {}).get("idle_memory_ratio", nan))]
    results["missed"] = missed = [name for name, value in checks if value > FLOORS[name.split()[0]]]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("view bench: " + ", ".join(f"{name} {value:.3g}" for name, value in checks)
          + f" ({args.clips} clips); floors missed: {', '.join(missed) or 'none'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
