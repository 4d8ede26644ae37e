"""The store viewer's server side: projection sidecar, safe media serving, pages and JSON, the CLI.

The store is made from the demo dataset (real WAV and MP4 files, 2 s clips), with embeddings, a log-mel
set, stored frames and a prediction run written directly (no encoder runs: the viewer only reads).
The browser test (test_view_browser.py) uses the same store.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the viewer's [view] extra (starlette, uvicorn, plotly) is not installed")

from featurestore.datasets import read_tau
from featurestore.demo import make_demo_dataset
from featurestore.store import create_store, open_store
from tests.conftest import TINY

EMBED = "clip/ViT-S-32-alt"
TEXT_SPEC = "cliptext/ViT-S-32-alt@none:3"
RUN = "a01"
LOGMEL = (8, 12)
FRAMES = (3, 16, 16)


def make_view_dataset(path: Path) -> Path:
    """The tiny demo set with 2 s clips (2 audio segments, 12 frames): real WAV/MP4 files, made in ~2 s."""
    return make_demo_dataset(path, **{**TINY, "duration": 2.0})


def build_view_store(path: Path, dataset: Path, text: str | None = None, manifest: Any = None) -> Path:
    """A store over ``dataset`` with an embedding set, log-mel, frames and one prediction run.

    ``text``: the sentence whose text-tower embedding (``TEXT_SPEC``) is written as the first tram
    clip's embedding, so a text search for it must find that clip first; otherwise 16-d embeddings.
    ``manifest``: the dataset's clips as read (default) or as a test changed them.
    """
    rng = np.random.default_rng(0)
    manifest = read_tau(dataset) if manifest is None else manifest
    with create_store(path, manifest) as store:
        n, seg, frames = store.n_clips, manifest.audio_segments, manifest.video_frames
        target = None
        if text is not None:
            from featurestore.encoders import create_encoder

            target = create_encoder(TEXT_SPEC).encode_text([text])[0].numpy()
        dim = 16 if target is None else target.shape[0]
        labels = np.asarray(store.labels)
        means = rng.normal(size=(len(store.classes), dim))
        emb = means[labels][:, None, :] + 0.3 * rng.normal(size=(n, seg, dim))
        if target is not None:
            emb[int(np.flatnonzero(labels == store.classes.index("tram"))[0])] = target
        prov = {"encoder": f"{EMBED.split('@')[0]}@none:3", "config": {}, "weights": {"kind": "random", "seed": 3}}
        store.create_feature_set(EMBED, seg, (dim,), prov)
        store.write_rows(EMBED, 0, emb.astype(np.float16))
        store.create_feature_set("logmel", seg, LOGMEL, {"encoder": "logmel", "config": {}, "weights": {"kind": "parameter-free"}})
        store.write_rows("logmel", 0, rng.normal(size=(n, seg, *LOGMEL)).astype(np.float16))
        store.create_feature_set("frames/16", frames, FRAMES, {"encoder": "frames/16", "config": {},
                                                               "weights": {"kind": "parameter-free"}}, dtype="uint8")
        store.write_rows("frames/16", 0, rng.integers(0, 255, size=(n, frames, *FRAMES), dtype=np.uint8))
        c = len(store.classes)  # right about two thirds of the time: the confusion matrix has errors to click
        logits = 1.5 * rng.normal(size=(n, 1, c)) + 0.5 * rng.normal(size=(n, seg, c)) + 2.5 * np.eye(c)[labels][:, None]
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        store.create_predictions(RUN, seg, {"head": "test"})
        store.write_predictions(RUN, np.arange(n), probs)
    return path


@pytest.fixture(scope="module")
def view_dataset(tmp_path_factory) -> Path:
    return make_view_dataset(tmp_path_factory.mktemp("view_dataset") / "demo")


@pytest.fixture(scope="module")
def view_store(view_dataset, tmp_path_factory) -> Path:
    return build_view_store(tmp_path_factory.mktemp("view") / "view.zarr", view_dataset)


@pytest.fixture(scope="module")
def server(view_store):
    from featurestore.viewer import start

    running = start(view_store)
    yield running
    running.stop()


def fetch(url: str) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET, errors included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def raw_get(url: str, target: str, host: str | None = None) -> tuple[int, bytes]:
    """A GET of ``target`` sent as written (no client-side normalisation of ``..`` or ``%2F``)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    conn.putrequest("GET", target, skip_host=host is not None)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    return answer.status, body


# -------------------------------------------------------------------------------- projection
def test_the_map_is_the_pca_of_the_clip_vectors_kept_in_a_sidecar_and_rebuilt_when_the_set_changes(tmp_path, view_dataset):
    from sklearn.decomposition import PCA

    from featurestore.store.search import clip_vectors
    from featurestore.viewer.projection import project, sidecar_dir

    path = build_view_store(tmp_path / "p.zarr", view_dataset)
    with open_store(path, "a") as store:
        first = project(store, EMBED)
        vectors = clip_vectors(store.get_many(EMBED, store.clip_ids))
        expected = PCA(n_components=2).fit_transform(vectors)  # scikit-learn's default solver, its sign rule
        np.testing.assert_allclose(first.xy, expected, atol=1e-4)
        assert first.seconds > 0 and first.kept_in.parent == sidecar_dir(store, EMBED)
        assert first.kept_in.parent == tmp_path / "p.zarr.view" / "clip" / "ViT-S-32-alt"
        again = project(store, EMBED)
        assert again.seconds == 0 and again.kept_in == first.kept_in
        np.testing.assert_array_equal(again.xy, first.xy)
        # rewriting finished rows with other values changes the set's data version: a new key, a new file
        store.write_rows(EMBED, 0, -store.read_rows(EMBED, 0, store.n_clips))
        rebuilt = project(store, EMBED)
    assert rebuilt.key != first.key and rebuilt.seconds > 0 and not first.kept_in.exists()
    assert [p.name for p in rebuilt.kept_in.parent.iterdir()] == [rebuilt.kept_in.name]


def test_the_pca_is_scikit_learns_on_a_larger_set_in_float32_blocks():
    """Several covariance blocks (BLOCK_ROWS shrunk), float16 input, one direction much stronger."""
    from sklearn.decomposition import PCA

    from featurestore.viewer import projection

    rng = np.random.default_rng(1)
    vectors = (rng.normal(size=(3000, 40)) * np.linspace(3, 0.1, 40)).astype(np.float16)
    old, projection.BLOCK_ROWS = projection.BLOCK_ROWS, 700
    try:
        ours = projection.project_vectors(vectors)
    finally:
        projection.BLOCK_ROWS = old
    expected = PCA(n_components=2).fit_transform(vectors.astype(np.float64))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=2e-3 * np.abs(expected).max())


def test_a_damaged_projection_file_is_never_served(tmp_path, view_dataset):
    from featurestore.viewer.projection import project

    path = build_view_store(tmp_path / "d.zarr", view_dataset)
    with open_store(path) as store:
        first = project(store, EMBED)
        data = bytearray(first.kept_in.read_bytes())
        data[-40] ^= 0xFF  # inside the xy array: the bytes no longer hash to the name
        first.kept_in.write_bytes(bytes(data))
        again = project(store, EMBED)
    assert again.seconds > 0  # recomputed, not read
    np.testing.assert_array_equal(again.xy, first.xy)


def test_a_store_this_process_cannot_write_gets_no_sidecar(tmp_path, view_dataset):
    """Started and serving every page on a store in a folder it cannot write: nothing is written."""
    from featurestore.viewer import start

    folder = tmp_path / "ro"
    path = build_view_store(folder / "s.zarr", view_dataset)
    listing = lambda: sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)  # noqa: E731
                             for p in folder.rglob("*"))
    before = listing()
    _make_unwritable(folder)
    try:
        running = start(path)
        try:
            assert len(running.state.projections[EMBED].rows) == 20 and running.state.projections[EMBED].kept_in is None
            clip = running.state.store.clip_ids[2]
            for target in [f"clip?id={clip}", "api/points?colour=correct:run:a01", f"frames.png?id={clip}",
                           f"logmel.png?id={clip}&set=logmel", "api/confusion?source=run:a01&split=",
                           f"api/search?q={clip}", f"media?id={clip}&kind=audio"]:
                assert fetch(running.url + target)[0] == 200, target
        finally:
            running.stop()
    finally:
        _make_writable(folder)
    assert listing() == before


def _make_unwritable(folder: Path) -> None:
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("root cannot make a folder unwritable here (no chattr +i)")
    else:
        folder.chmod(0o555)


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------ media
def test_media_is_served_for_listed_files_and_nothing_else(server, view_store, view_dataset):
    with open_store(view_store) as store:
        clip, audio_rel = store.clip_ids[3], str(store.column("audio_path")[3])
    status, body, kind = fetch(server.url + f"media?id={clip}&kind=audio")
    assert status == 200 and kind == "audio/wav" and body == (view_dataset / audio_rel).read_bytes()
    for target in ["/media?id=..%2F..%2Fetc%2Fpasswd&kind=audio", "/media?id=/etc/passwd&kind=audio",
                   f"/media?id={clip}%2F..%2F..&kind=audio", "/media/../../etc/passwd", "/media?id=..&kind=audio",
                   f"/media?id={clip}&kind=..%2Fmeta.csv", "/static/..%2F..%2Fstore.py", "/static/../app.py",
                   f"/media?id={clip}&kind=/etc/passwd"]:
        status, body = raw_get(server.url, target)
        assert status == 404, (target, status, body[:200])
        assert b"root:" not in body and b"import" not in body


def test_a_store_listing_a_path_outside_its_dataset_root_serves_nothing(tmp_path, view_dataset):
    """A crafted index (an absolute path, a ``..`` path), a link inside the dataset pointing out, a link loop."""
    from featurestore.viewer.media import MediaRefused, media_path

    data = tmp_path / "data"
    shutil.copytree(view_dataset, data)
    manifest = read_tau(data)
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"RIFF secret")
    linked = data / manifest.clips[1].audio
    linked.unlink()
    linked.symlink_to(secret)
    manifest.clips[0].audio = secret  # outside the root: the index keeps it absolute
    manifest.clips[2].audio = data / "audio" / ".." / ".." / "secret.wav"
    looped = data / manifest.clips[4].audio
    looped.unlink()
    looped.symlink_to(looped.name)  # a link to itself
    with create_store(tmp_path / "s.zarr", manifest) as store:
        ids = store.clip_ids[:5]
        for clip in ids[:3]:
            with pytest.raises(MediaRefused, match="dataset root|not a path inside"):
                media_path(store, clip, "audio")
        with pytest.raises(MediaRefused, match="cannot be read"):
            media_path(store, ids[4], "audio")
        assert media_path(store, ids[3], "audio") == (data / str(store.column("audio_path")[3])).resolve()


def test_a_missing_media_file_is_a_note_on_the_clip_page(tmp_path, view_dataset):
    from featurestore.viewer import start

    data = tmp_path / "data"
    shutil.copytree(view_dataset, data)
    path = build_view_store(tmp_path / "s.zarr", data)
    with open_store(path) as store:
        clip, rel = store.clip_ids[0], str(store.column("audio_path")[0])
    (data / rel).unlink()
    running = start(path)
    try:
        status, body, _ = fetch(running.url + f"clip?id={clip}")
        assert status == 200 and b'id="audio-note"' in body and rel.encode() in body and b"<audio" not in body
        assert fetch(running.url + f"media?id={clip}&kind=audio")[0] == 404
    finally:
        running.stop()


def test_only_local_host_names_are_answered_by_default(server):
    assert raw_get(server.url, "/api/info", host="evil.example:80")[0] == 400
    assert raw_get(server.url, "/api/info", host="localhost")[0] == 200


# ------------------------------------------------------------------------------- the pages
def test_the_clip_page_shows_the_clip_its_outputs_and_its_neighbours(server, view_store):
    with open_store(view_store) as store:
        clip = store.clip_ids[5]
        probs = store.get_predictions(RUN, [clip])[0].mean(0)
        near = store.search(EMBED, clip, k=8, method="exact").clip_ids
        label = store.classes[int(store.labels[5])]
    status, body, _ = fetch(server.url + f"clip?id={clip}")
    page = body.decode()
    assert status == 200 and f'<h1 id="clip-id">{clip}</h1>' in page and f"<td id='meta-label'>{label}</td>" in page
    assert f'src="media?id={clip}&amp;kind=audio"' in page
    shown = [float(v) for v in __import__("re").findall(r"data-source='run:a01' data-class='[^']+' data-value='([^']+)'", page)]
    np.testing.assert_array_equal(np.array(shown, dtype=np.float32), probs.astype(np.float32))
    assert [m for m in __import__("re").findall(r"clip\?id=([^&']+)&amp;set=", page)] == near
    status, body, _ = fetch(server.url + "clip?id=no-such-clip")
    assert status == 404 and b"not in the store" in body


def test_frames_and_logmel_pictures(server, view_store, tmp_path):
    from PIL import Image

    with open_store(view_store) as store:
        clip = store.clip_ids[2]
        frames = store.get("frames/16", clip)
        n_seg = store.feature_info("logmel").n_segments
    status, body, kind = fetch(server.url + f"frames.png?id={clip}")
    assert status == 200 and kind == "image/png"
    image = np.asarray(Image.open(__import__("io").BytesIO(body)))
    np.testing.assert_array_equal(image, np.concatenate(list(frames.transpose(0, 2, 3, 1)), axis=1))
    status, body, kind = fetch(server.url + f"logmel.png?id={clip}&set=logmel")
    image = Image.open(__import__("io").BytesIO(body))
    assert status == 200 and image.size[0] == n_seg * LOGMEL[1] and image.size[1] % LOGMEL[0] == 0


def test_frames_are_decoded_from_the_video_when_the_store_holds_none(tmp_path, view_dataset):
    from featurestore.decode.video import sample_frames
    from featurestore.viewer.app import _Handlers
    from featurestore.viewer import prepare

    manifest = read_tau(view_dataset)
    with create_store(tmp_path / "bare.zarr", manifest) as store:
        pass
    with open_store(tmp_path / "bare.zarr") as store:
        state = prepare(store)
        assert state.projections == {} and state.sources == {}
        strip = _Handlers(state, __import__("threading").Lock())._frames(manifest.clips[0].clip_id)
    frames = sample_frames(view_dataset / manifest.clips[0].video, manifest.video_frames)
    np.testing.assert_array_equal(strip, np.concatenate(list(frames), axis=1))


def test_map_points_confusion_and_search_answer_from_the_store(server, view_store):
    with open_store(view_store) as store:
        labels, classes = np.asarray(store.labels), store.classes
        member = store.column("split/fold1_train").astype(bool)
        pred = store.get_predictions(RUN).mean(1).argmax(1)
        ids = store.clip_ids
        near = store.search(EMBED, ids[4], k=19, method="exact").clip_ids
    wire = json.loads(fetch(server.url + "api/points?colour=correct:run:a01")[1])
    codes = np.frombuffer(__import__("base64").b64decode(wire["group"]), dtype="<u2")
    right = {i: wire["groups"][g] for i, g in zip(wire["ids"].split("\n"), codes)}
    proj = server.state.projections[EMBED]
    assert wire["ids"].split("\n") == [ids[r] for r in proj.rows]
    np.testing.assert_array_equal(np.frombuffer(__import__("base64").b64decode(wire["x"]), "<f4"), proj.xy[:, 0])
    assert sorted(right) == sorted(ids)
    assert all(right[c] == ("right" if pred[r] == labels[r] else "wrong") for r, c in enumerate(ids))
    cm = json.loads(fetch(server.url + "api/confusion?source=run:a01&split=fold1_train")[1])
    expected = np.zeros((len(classes),) * 2, dtype=int)
    np.add.at(expected, (labels[member], pred[member]), 1)
    assert cm["counts"] == expected.tolist() and cm["n"] == int(member.sum())
    for cell, clips in cm["cells"].items():
        t, p = map(int, cell.split(","))
        assert all(labels[ids.index(c)] == t and pred[ids.index(c)] == p and member[ids.index(c)] for c in clips)
    found = json.loads(fetch(server.url + f"api/search?q={ids[4]}")[1])
    assert [r["clip_id"] for r in found["results"]] == [ids[4], *near]
    status, body, _ = fetch(server.url + "api/points?colour=predicted:run:nope")
    assert status == 400 and b"cannot colour by" in body


def test_every_colouring_gives_each_clip_its_own_value(server, view_store):
    with open_store(view_store) as store:
        ids, classes = store.clip_ids, store.classes
        city = dict(zip(ids, store.column("city")))
        train = dict(zip(ids, store.column("split/fold1_train")))
        pred = dict(zip(ids, store.get_predictions(RUN).mean(1).argmax(1)))
    for colour, expected in [("city", lambda c: city[c]), ("predicted:run:a01", lambda c: classes[pred[c]]),
                             ("split", lambda c: "fold1_train" if train[c] else None)]:
        wire = json.loads(fetch(server.url + f"api/points?colour={colour}")[1])
        codes = np.frombuffer(__import__("base64").b64decode(wire["group"]), dtype="<u2")
        for clip, code in zip(wire["ids"].split("\n"), codes):
            want = expected(clip)
            assert want is None and wire["groups"][code] != "fold1_train" or wire["groups"][code] == want, (colour, clip)


def test_serving_pages_changes_nothing_in_the_store(tmp_path, view_dataset):
    from featurestore.viewer import start

    path = build_view_store(tmp_path / "s.zarr", view_dataset)
    listing = lambda: sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)  # noqa: E731
                             for p in path.rglob("*"))
    before = listing()
    running = start(path)
    try:
        with open_store(path) as store:
            clip = store.clip_ids[1]
        for target in [f"clip?id={clip}", "api/points?colour=correct:run:a01", f"frames.png?id={clip}",
                       f"logmel.png?id={clip}&set=logmel", "api/confusion?source=run:a01&split=", f"api/search?q={clip}"]:
            assert fetch(running.url + target)[0] == 200, target
    finally:
        running.stop()
    assert listing() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "s.zarr.search", "s.zarr.view"]


def test_a_store_without_runs_or_media_still_has_its_map_and_clip_pages(tmp_path):
    from featurestore.viewer import start
    from tests.heads._store import build_store

    path = build_store(tmp_path / "plain.zarr", n_clips=16)
    running = start(path, feature_sets=["clip/RN101"])
    try:
        info = json.loads(fetch(running.url + "api/info")[1])
        assert info["outputs"] == [] and info["feature_sets"] == {"clip/RN101": {"method": "pca", "n": 16}}
        with open_store(path) as store:
            clip = store.clip_ids[0]
        status, body, _ = fetch(running.url + f"clip?id={clip}")
        assert status == 200 and b"No prediction run" in body and b"no audio file" in body
        assert b"frames.png" in body and b"logmel.png" in body
    finally:
        running.stop()


# ---------------------------------------------------------------------------------- the CLI
def test_the_cli_names_the_extra_when_it_is_missing(view_store):
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from featurestore.cli import main\n"
            f"sys.exit(main(['view', {str(view_store)!r}, '--port', '0']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "featurestore view: error: featurestore view needs the [view] extra (uvicorn is not installed): "
        "pip install 'avscene[view]'"]


def test_another_host_prints_a_warning(view_store, capsys):
    from featurestore.viewer import start

    running = start(view_store, host="0.0.0.0")
    try:
        assert running.url.startswith("http://0.0.0.0:")
        assert "WARNING: featurestore view listens on 0.0.0.0" in capsys.readouterr().err
    finally:
        running.stop()


def test_the_default_binds_the_loopback_address(server):
    assert server.url.startswith("http://127.0.0.1:")


def test_umap_without_umap_learn_is_one_line(view_store, capsys):
    import importlib.util

    from featurestore.cli import main

    if importlib.util.find_spec("umap") is not None:
        pytest.skip("umap-learn is installed: the missing-package line cannot show")
    assert main(["view", str(view_store), "--port", "0", "--method", "umap"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "featurestore view: error: the umap projection needs umap-learn (not installed): pip install umap-learn, "
        "or use --method pca"]


def test_the_cli_prints_its_url_serves_and_stops_on_ctrl_c(view_store):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "featurestore", "view", "--store", str(view_store), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("featurestore view:"):  # the start's lines, then the URL
            lines.append(proc.stdout.readline())
        assert lines[0].startswith(f"map of {EMBED}: 20 clips, pca ")
        assert all(line.startswith("neighbours of ") for line in lines[1:-1])
        assert lines[-1].startswith("featurestore view: http://127.0.0.1:") and lines[-1].endswith(" (Ctrl-C to stop)\n")
        url = lines[-1].split()[2]
        assert json.loads(fetch(url + "api/info")[1])["n_clips"] == 20
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == ""


def test_the_function_and_the_package_have_their_own_names():
    """``featurestore.view`` is the function; the package is ``featurestore.viewer``, whose modules import by name."""
    import featurestore
    import featurestore.viewer.media as media

    assert callable(featurestore.view) and featurestore.view is featurestore.viewer.view
    assert media.KINDS == {"audio": "audio_path", "video": "video_path"}


# ------------------------------------------------------------------------- a hostile review
#: Markup in the store's own text (class, city and split names are free text in a dataset's CSV).
HOSTILE = '<b>x<a href="https:evil.example">y<img src=x onerror="window.pwned=1">%{x}'  # no '/': store paths hold split names


def hostile_manifest(dataset: Path) -> Any:
    """The demo manifest with ``bus`` renamed to ``bus`` + `HOSTILE`, and one clip's city and an extra split hostile."""
    manifest = read_tau(dataset)
    bus = manifest.classes.index("bus")
    manifest.classes[bus] = "bus" + HOSTILE
    for clip in manifest.clips:
        clip.label = manifest.classes[bus] if clip.label == "bus" else clip.label
    manifest.clips[0].city = "city" + HOSTILE
    manifest.clips[0].splits = frozenset({*manifest.clips[0].splits, "split" + HOSTILE})
    return manifest


def test_the_stores_text_is_escaped_on_pages_and_errors_are_plain_text(tmp_path, view_dataset):
    from featurestore.viewer import start

    path = build_view_store(tmp_path / "h.zarr", view_dataset, manifest=hostile_manifest(view_dataset))
    running = start(path)
    try:
        with open_store(path) as store:
            clip = store.clip_ids[0]
        status, body, _ = fetch(running.url + f"clip?id={clip}")
        page = body.decode()
        assert status == 200 and HOSTILE not in page and "<img src=x" not in page and 'href="https:evil' not in page
        from html import escape

        assert escape("city" + HOSTILE) in page and escape("split" + HOSTILE) in page and escape("bus" + HOSTILE) in page
        for target in ["clip?id=%3Cscript%3Ealert(1)%3C/script%3E", "api/search?q=%3Cscript%3E&k=0",
                       "api/confusion?source=%3Cscript%3E", "api/points?colour=%3Cimg%20src=x%3E"]:
            status, body, kind = fetch(running.url + target)
            assert status in (400, 404) and kind.startswith("text/plain") and b"\n" not in body.strip(), target
        answer = urllib_head(running.url + "clip?id=nope")
        assert answer["x-content-type-options"] == "nosniff" and "script-src 'self'" in answer["content-security-policy"]
        assert "'unsafe-inline'" not in answer["content-security-policy"].split("script-src")[1].split(";")[0]
    finally:
        running.stop()


def urllib_head(url: str) -> dict[str, str]:
    """The response headers of a GET (errors included), names in lower case."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return {k.lower(): v for k, v in answer.headers.items()}
    except urllib.error.HTTPError as err:
        return {k.lower(): v for k, v in err.headers.items()}


def test_spoofed_host_headers_are_refused_and_the_ipv6_loopback_is_answered(view_store):
    from featurestore.viewer import start

    running = start(view_store, host="::1")
    try:
        port = running.url.rsplit(":", 1)[1].strip("/")
        assert running.url.startswith("http://[::1]:")
        for host, status in [(f"[::1]:{port}", 200), ("[::1]", 200), (f"localhost:{port}", 200),
                             ("evil.example", 400), (f"127.0.0.1.evil.example:{port}", 400),
                             (f"localhost:{port}@evil.example", 400), ("[::1].evil.example", 400), ("", 400)]:
            got, body = raw_get(running.url, "/api/info", host=host)
            assert got == status, (host, got, body[:200])
            assert status == 200 or b"not a loopback name" in body
    finally:
        running.stop()


def test_hostile_media_requests_serve_nothing_but_the_listed_file(tmp_path, view_dataset):
    """NUL bytes, double encoding, huge or many ranges, and a listed file swapped for a link after start."""
    import http.client

    from featurestore.viewer import start

    data = tmp_path / "data"
    shutil.copytree(view_dataset, data)
    path = build_view_store(tmp_path / "s.zarr", data)
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"RIFF secret")
    with open_store(path) as store:
        clip, other = store.clip_ids[3], store.clip_ids[6]
        wav = data / str(store.column("audio_path")[3])
        swapped = data / str(store.column("audio_path")[6])
    running = start(path)
    try:
        for target in [f"/media?id={clip}%00&kind=audio", f"/media?id={clip}&kind=audio%00", "/media?id=%00&kind=audio",
                       "/media?id=%252e%252e%252fsecret.wav&kind=audio", "/media?id=%2e%2e%2f%2e%2e%2fsecret.wav&kind=audio",
                       f"/media?id={clip}%252F..%252F..%252Fsecret.wav&kind=audio", f"/media?id={tmp_path}/secret.wav&kind=audio"]:
            status, body = raw_get(running.url, target)
            assert status == 404 and b"secret" not in body.replace(b"secret.wav", b""), (target, status, body[:200])
        where = running.url.split("//")[1].strip("/").split(":")
        for ranges, status, size in [("bytes=0-99999999999999999999999", 206, wav.stat().st_size),
                                     ("bytes=-99999999999999999999999", 206, wav.stat().st_size),
                                     ("bytes=99999999999999999999-", 416, 0),
                                     ("bytes=" + ",".join(f"{i}-{i}" for i in range(2000)), 200, wav.stat().st_size)]:
            conn = http.client.HTTPConnection(where[0], int(where[1]), timeout=30)
            conn.request("GET", f"/media?id={clip}&kind=audio", headers={"Range": ranges})
            answer = conn.getresponse()
            body = answer.read()
            conn.close()
            assert (answer.status, len(body)) == (status, size), ranges[:40]
            assert status != 206 or body == wav.read_bytes()
        assert fetch(running.url + f"media?id={other}&kind=audio")[0] == 200
        swapped.unlink()
        swapped.symlink_to(secret)  # after start: each request resolves the path again
        status, body, _ = fetch(running.url + f"media?id={other}&kind=audio")
        assert status == 404 and b"outside the dataset root" in body and b"RIFF secret" not in body
    finally:
        running.stop()


def test_a_store_deleted_while_the_app_runs_is_a_one_line_503_and_the_server_goes_on(tmp_path, view_dataset):
    from featurestore.viewer import start

    path = build_view_store(tmp_path / "s.zarr", view_dataset)
    with open_store(path) as store:
        clip, later = store.clip_ids[3], store.clip_ids[9]
    running = start(path)
    try:
        assert fetch(running.url + f"clip?id={clip}")[0] == 200
        shutil.rmtree(path)
        gone = []  # what the app holds in memory (index columns, the map) is still answered; a read is not
        for target in [f"clip?id={later}", f"frames.png?id={clip}", f"logmel.png?id={clip}&set=logmel",
                       "api/points?colour=city", "api/confusion?source=run:a01&split=", f"api/search?q={clip}"]:
            status, body, kind = fetch(running.url + target)
            text = body.decode(errors="replace")
            assert status in (200, 503), (target, status, text[:200])
            if status == 503:
                gone.append(target.split("?")[0])
                assert kind.startswith("text/plain") and "\n" not in text.strip() and "Traceback" not in text
                assert text.startswith(f"the store {path} was deleted or replaced while featurestore view runs (")
        assert {"frames.png", "logmel.png"} <= set(gone), gone
        assert fetch(running.url)[0] == 200 and fetch(running.url + "static/view.js")[0] == 200
        assert json.loads(fetch(running.url + "api/info")[1])["n_clips"] == 20  # what it read at start
    finally:
        running.stop()


def test_query_parameters_out_of_range_are_one_line_400s(server, view_store):
    with open_store(view_store) as store:
        clip = store.clip_ids[4]
        near = store.search(EMBED, clip, k=3, method="exact").clip_ids
    found = json.loads(fetch(server.url + f"api/search?q={clip}&k=3")[1])
    assert [r["clip_id"] for r in found["results"]] == [clip, *near[:2]]
    assert [r["clip_id"] for r in json.loads(fetch(server.url + f"api/search?q={clip}&k=1")[1])["results"]] == [clip]
    for target, line in [(f"api/search?q={clip}&k=0", "k must be a whole number from 1 to 200, got '0'"),
                         (f"api/search?q={clip}&k=201", "k must be a whole number from 1 to 200, got '201'"),
                         (f"api/search?q={clip}&k=-1", "k must be a whole number from 1 to 200, got '-1'"),
                         (f"api/search?q={clip}&k=1e9", "k must be a whole number from 1 to 200, got '1e9'"),
                         (f"api/search?q={clip}&k=" + "9" * 400, "k must be a whole number from 1 to 200, got '" + "9" * 20 + "'"),
                         ("api/search?q=" + "a" * 1001, "the query has 1001 characters; at most 1000"),
                         ("api/confusion?source=run:a01&split=%00",
                          "no split '\\x00' in the store; it has fold1_evaluate, fold1_test, fold1_train")]:
        status, body, _ = fetch(server.url + target)
        assert (status, body.decode()) == (400, line), target


def test_umap_when_umap_learn_is_installed_is_kept_beside_the_pca_map(tmp_path, view_dataset):
    pytest.importorskip("umap", reason="umap-learn is not installed (optional; not in [test]): the umap map is untested here")
    from featurestore.viewer.projection import project

    path = build_view_store(tmp_path / "u.zarr", view_dataset)
    with open_store(path, "a") as store:
        pca, first = project(store, EMBED, "pca"), project(store, EMBED, "umap")
        again = project(store, EMBED, "umap")
        n = store.n_clips
    assert first.method == "umap" and first.xy.shape == (n, 2) and np.isfinite(first.xy).all() and first.seconds > 0
    assert first.key != pca.key and first.kept_in.exists() and first.kept_in.parent == pca.kept_in.parent
    assert again.seconds == 0 and again.kept_in == first.kept_in
    np.testing.assert_array_equal(again.xy, first.xy)


def test_a_projection_file_of_another_store_renamed_to_this_key_is_never_served(tmp_path, view_dataset):
    """Its name's sha256 is right for its bytes; before the binding, the other store's coordinates
    were drawn for this store's clips."""
    from featurestore.viewer.projection import project

    mine = build_view_store(tmp_path / "a.zarr", view_dataset)
    other = build_view_store(tmp_path / "b.zarr", view_dataset)
    with open_store(other, "a") as store:
        store.write_rows(EMBED, 0, store.read_rows(EMBED, 0, store.n_clips)[::-1].copy())  # other clips' vectors
        theirs = project(store, EMBED)
    with open_store(mine) as store:
        first = project(store, EMBED)
        assert not np.allclose(first.xy, theirs.xy)
        first.kept_in.unlink()
        key, _, rest = theirs.kept_in.name.partition("-")
        (first.kept_in.parent / f"{first.key}-{rest}").write_bytes(theirs.kept_in.read_bytes())
        again = project(store, EMBED)
    assert again.seconds > 0  # recomputed, not read
    np.testing.assert_array_equal(again.xy, first.xy)
    assert [p.name for p in again.kept_in.parent.iterdir()] == [again.kept_in.name]
