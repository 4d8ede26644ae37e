"""The store viewer's map groups and media files under hostile stores (docs/view.md): more groups
than uint16 codes hold, a class named like the built-in "(no label)" group, and a listed media file
swapped for a link (or a FIFO) between the check of its path and its opening.

HTTP-level checks go through a real server (`featurestore.viewer.start`) and urllib, the data-level
ones through `featurestore.viewer.data` directly; no browser is needed for any of them.
"""
from __future__ import annotations

import base64
import html
import http.client
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the viewer's [view] extra (starlette, uvicorn, plotly) is not installed")

from featurestore import ClipRecord, Manifest, create_store, open_store  # noqa: E402
from featurestore.datasets import read_tau  # noqa: E402
from tests.featurestore.test_view import EMBED, RUN, build_view_store, fetch, make_view_dataset  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_view_dataset(tmp_path_factory.mktemp("hostile_viewer_groups") / "demo")


# ------------------------------------------------------------------------- more than 65,536 groups
def test_more_groups_than_uint16_holds_keep_each_point_its_own_group(tmp_path):
    """A city per clip, 65,540 of them: the group codes went to the page as uint16, so the codes
    65,536.. wrapped to 0.. and those points were drawn in the first cities' colours, silently.
    Now the codes go as uint32 past 65,536 groups, and the page reads the type the server names."""
    from featurestore.viewer.data import ViewState, map_points
    from featurestore.viewer.projection import project

    n = (1 << 16) + 4
    cities = [f"c{i:06d}" for i in range(n)]
    clips = [ClipRecord(f"clip-{i}", label="a", city=cities[i], location=cities[i]) for i in range(n)]
    with create_store(tmp_path / "many.zarr", Manifest("many", ["a"], clips)) as store:
        store.create_feature_set(EMBED, 1, (2,), {"encoder": "clip/ViT-B-32@none:3", "config": {},
                                                  "weights": {"kind": "random", "seed": 3}})
        xy = np.stack([np.cos(np.arange(n) / n * 6), np.sin(np.arange(n) / n * 6)], axis=1)
        store.write_rows(EMBED, 0, xy[:, None, :].astype(np.float16))
        state = ViewState(store, {EMBED: project(store, EMBED, "pca", keep=False)}, {})
        points = map_points(state, EMBED, "city")
        shown = np.array(points["groups"], dtype=object)[points["group"]]
        truth = store.column("city")[state.projections[EMBED].rows]
        assert (shown == truth).all(), f"{int((shown != truth).sum())} points coloured as another city"
        assert points.get("group_dtype") == "uint32" and len(points["groups"]) == n
        label = map_points(state, EMBED, "label")  # one group: the codes stay 2 bytes a point
        assert label["group_dtype"] == "uint16" and label["groups"] == ["a"] and (label["group"] == 0).all()


def test_the_page_reads_the_group_codes_in_the_type_the_server_names(tmp_path):
    """The page's decoding of the wire codes (view.js `decode` with `CODES`), run by node on a
    uint32 payload: before, the page decoded every payload as Uint16Array."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH to run view.js's decoding")
    from featurestore.viewer.app import STATIC

    source = (STATIC / "view.js").read_text()
    decode = source[source.index("const CODES"):source.index("async function drawMap")]
    codes = np.array([0, 65_535, 65_536, 70_000], dtype="<u4")
    wire = base64.b64encode(codes.tobytes()).decode()
    script = tmp_path / "decode.js"
    script.write_text(decode + f'console.log(JSON.stringify(Array.from(decode("{wire}", CODES["uint32"]))));')
    out = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == codes.tolist()


# ------------------------------------------------------------------- a class named like a built-in
def built_in_named_manifest(dataset: Path) -> tuple[Any, str, str]:
    """The demo with its first class named "(no label)", its second "(not predicted)", four clips
    of other classes unlabelled, the training split named "(none)" and one clip in no split."""
    manifest = read_tau(dataset)
    first, second = manifest.classes[0], manifest.classes[1]
    renamed = {first: "(no label)", second: "(not predicted)"}
    manifest.classes = [renamed.get(c, c) for c in manifest.classes]
    others = [c for c in manifest.clips if c.label not in renamed]
    for clip in manifest.clips:
        clip.label = renamed.get(clip.label, clip.label)
        clip.splits = frozenset("(none)" if s == "fold1_train" else s for s in clip.splits)
    for clip in others[:4]:
        clip.label = None
    others[5].splits = frozenset()
    return manifest, others[0].clip_id, next(c.clip_id for c in manifest.clips if c.label == "(no label)")


def test_a_class_named_like_the_built_in_groups_keeps_its_own_group_and_name(tmp_path, dataset):
    """A class literally named "(no label)" got the unlabelled clips' name: two legend entries
    "(no label)", one of them the class, and the clip page of an unlabelled clip read as that class.
    The built-in groups now take a name no class (or split) has: "(no label 2)"."""
    from featurestore.viewer import start
    from featurestore.viewer.data import colour_codes, colour_values, map_points

    manifest, unlabelled, in_class = built_in_named_manifest(dataset)
    running = start(build_view_store(tmp_path / "s.zarr", dataset, manifest=manifest))
    try:
        state = running.state
        rows = state.projections[EMBED].rows
        for colour in ("label", "split", f"predicted:run:{RUN}"):
            names = colour_codes(state, rows, colour)[0]
            assert len(set(names)) == len(names), (colour, names)
            shown = map_points(state, EMBED, colour)["groups"]
            assert len(set(shown)) == len(shown), (colour, shown)
        labels = colour_values(state, rows, "label")
        ids = state.store.index.ids_at(rows)
        assert labels[ids.index(unlabelled)] == "(no label 2)" and labels[ids.index(in_class)] == "(no label)"
        assert (labels == "(no label 2)").sum() == 4
        splits = colour_values(state, rows, "split")
        assert (splits == "(none 2)").sum() == 1 and (splits == "(none)").sum() > 1
        nowhere = ids[int(np.flatnonzero(splits == "(none 2)")[0])]
        for clip, field, shown in [(unlabelled, "label", "(no label 2)"), (in_class, "label", "(no label)"),
                                   (nowhere, "splits", "(none 2)")]:
            status, body, _ = fetch(running.url + "clip?" + urlencode({"id": clip}))
            assert status == 200, body[:300]
            cell = re.search(rf"<td id='meta-{field}'>([^<]*)</td>", body.decode()).group(1)
            assert html.unescape(cell) == shown
    finally:
        running.stop()


# ------------------------------------------------------------- a media file swapped after its check
@pytest.fixture
def swap_store(tmp_path, dataset) -> tuple[Path, Path, Path]:
    """(dataset copy, store over it, a secret file outside the dataset)."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    secret_dir = tmp_path / "outside" / "audio"
    secret_dir.mkdir(parents=True)
    for wav in (data / "audio").iterdir():  # the same names outside: a folder swap finds every file
        (secret_dir / wav.name).write_bytes(b"RIFF secret")
    return data, build_view_store(tmp_path / "s.zarr", data), secret_dir


def swap(kind: str, listed: Path, secret_dir: Path) -> None:
    """Replace the listed file (or its folder) the way an attacker with write access to the dataset would."""
    if kind == "file link":
        listed.unlink()
        listed.symlink_to(secret_dir / listed.name)
    elif kind == "folder link":
        listed.parent.rename(listed.parent.with_name("moved"))
        listed.parent.symlink_to(secret_dir, target_is_directory=True)
    else:
        listed.unlink()
        os.mkfifo(listed)


@pytest.mark.parametrize("kind", ["file link", "folder link", "fifo"])
def test_a_media_file_swapped_between_its_check_and_its_opening_is_not_served(swap_store, monkeypatch, kind):
    """The path was checked under the lock (every link resolved, inside the root, a regular file)
    and Starlette's FileResponse opened it again later, while sending: a file swapped for a link
    out of the dataset in between was served. The swap happens right after the check here (the
    check is wrapped, in the media module and in the app, where the old app called it). Now the
    file is opened once, name by name without following links, and that descriptor is served."""
    import featurestore.viewer.app as app_module
    import featurestore.viewer.media as media_module
    from featurestore.viewer import start

    data, path, secret_dir = swap_store
    with open_store(path) as store:
        clip, listed = store.clip_ids[3], data / str(store.column("audio_path")[3])
    checked = media_module.media_path

    def check_then_swap(*args: Any, **kwargs: Any) -> Path:
        real = checked(*args, **kwargs)
        if args[1] == clip and not listed.is_symlink() and not listed.parent.is_symlink() and listed.is_file():
            swap(kind, listed, secret_dir)
        return real

    monkeypatch.setattr(media_module, "media_path", check_then_swap)
    monkeypatch.setattr(app_module, "media_path", check_then_swap, raising=False)
    running = start(path)
    try:
        status, body, kind_header = fetch(running.url + "media?" + urlencode({"id": clip, "kind": "audio"}))
        assert b"RIFF secret" not in body
        assert (status, kind_header.split(";")[0]) == (404, "text/plain"), (status, body[:200])
        assert body.decode().startswith(f"the audio file of clip {clip!r} (")
        other = running.state.store.clip_ids[12 if kind == "folder link" else 6]
        status, body, _ = fetch(running.url + "media?" + urlencode({"id": other, "kind": "audio"}))
        assert status == (404 if kind == "folder link" else 200), body[:200]  # the folder is a link now
    finally:
        running.stop()


def _get(url: str, target: str, headers: dict[str, str], method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    conn.request(method, target, headers=headers)
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, body


def test_media_ranges_are_served_from_the_open_file(swap_store):
    """What a media player asks (one range at a time, HEAD, If-Range) answered from the descriptor
    `open_media` opened, as Starlette's FileResponse answered from the path."""
    from featurestore.viewer import start

    data, path, _ = swap_store
    with open_store(path) as store:
        clip, wav = store.clip_ids[3], (data / str(store.column("audio_path")[3])).read_bytes()
    running = start(path)
    target, size = "/media?" + urlencode({"id": clip, "kind": "audio"}), len(wav)
    try:
        status, head, body = _get(running.url, target, {})
        assert (status, body, head["content-type"], head["accept-ranges"]) == (200, wav, "audio/wav", "bytes")
        for asked, (first, end) in [("bytes=0-", (0, size)), ("bytes=10-99", (10, 100)), ("bytes=-7", (size - 7, size)),
                                    (f"bytes=5-{size * 9}", (5, size)), ("bytes=0-0", (0, 1))]:
            status, got, body = _get(running.url, target, {"Range": asked})
            assert (status, body, got["content-range"]) == (206, wav[first:end], f"bytes {first}-{end - 1}/{size}"), asked
        for asked in ["bytes=3-2", "bytes=0-1,5-9", "lines=1-2"]:  # ignored: the whole file
            assert _get(running.url, target, {"Range": asked})[::2] == (200, wav), asked[:20]
        for asked in [f"bytes={size}-", "bytes=" + "9" * 5000 + "-", "bytes=-0"]:  # past the end (no 4,300-digit int())
            status, got, body = _get(running.url, target, {"Range": asked})
            assert (status, got["content-range"], body) == (416, f"bytes */{size}", b""), asked[:20]
        assert _get(running.url, target, {"Range": "bytes=0-3", "If-Range": '"other"'})[::2] == (200, wav)
        etag = head["etag"]
        assert _get(running.url, target, {"Range": "bytes=0-3", "If-Range": etag})[::2] == (206, wav[:4])
        status, got, body = _get(running.url, target, {"Range": "bytes=4-9"}, method="HEAD")
        assert (status, got["content-length"], got["content-range"], body) == (206, "6", f"bytes 4-9/{size}", b"")
    finally:
        running.stop()


# ------------------------------------------------------------------ an output that answers wrongly
@pytest.mark.parametrize("fault", ["nan row", "too few classes", "covered too short"])
def test_an_output_that_answers_nan_or_the_wrong_shape_is_named_not_drawn(tmp_path, dataset, fault):
    """An output is any ``featurestore.view_outputs`` provider's ``(score, covered)`` pair (a fused
    recipe). A NaN row was argmax-ed to class 0 (numpy takes NaN as the largest), so that clip was
    drawn and counted in the confusion matrix as predicted class 0, silently; scores with too few
    columns were read as predictions of the first classes. Now one line naming the output."""
    from featurestore.viewer.data import ViewState, clip_page, colour_codes, confusion
    from featurestore.viewer.outputs import Source, run_source
    from featurestore.viewer.projection import project

    with open_store(build_view_store(tmp_path / "s.zarr", dataset)) as store:
        run, bad_clip = run_source(store, RUN), store.clip_ids[4]

        def score(clip_ids: list[str]) -> np.ndarray:
            out = run.score(clip_ids)
            if fault == "nan row":
                out[[i for i, c in enumerate(clip_ids) if c == bad_clip]] = np.nan
            return out[:, :-1] if fault == "too few classes" else out

        covered = (lambda: run.covered()[:-1]) if fault == "covered too short" else run.covered
        state = ViewState(store, {EMBED: project(store, EMBED, "pca", keep=False)}, {"fused:x": Source("fused:x", score, covered)})
        said = {"nan row": f"output 'fused:x' gave non-finite scores for 1 clip(s), e.g. {bad_clip!r}",
                "too few classes": "output 'fused:x' gave scores of shape (20, 9) for 20 clip(s) of 10 classes",
                "covered too short": "output 'fused:x' says which clips it covers with shape (19,); expected (20,)"}[fault]
        for ask in (lambda: colour_codes(state, state.projections[EMBED].rows, "predicted:fused:x"),
                    lambda: confusion(state, "fused:x", None)):
            with pytest.raises(ValueError, match=re.escape(said)):
                ask()
        if fault == "nan row":
            with pytest.raises(ValueError, match=re.escape(said)):
                clip_page(state, bad_clip, EMBED)
            assert len(clip_page(state, store.clip_ids[5], EMBED)["outputs"]["fused:x"]) == 10


def test_a_video_swapped_after_its_check_gives_no_frames(tmp_path, dataset, monkeypatch):
    """The clip page's frames of a store without a frames set are decoded from the clip's video: the
    decoder opened the checked path again, so a video swapped for a link to another file outside
    the dataset was decoded and its frames shown. Now the decoder reads the descriptor opened."""
    import featurestore.viewer.app as app_module
    import featurestore.viewer.media as media_module
    from featurestore.viewer import start

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    manifest = read_tau(data)
    with create_store(tmp_path / "bare.zarr", manifest):
        pass
    clip, listed = manifest.clips[0].clip_id, data / manifest.clips[0].video
    secret = tmp_path / "secret.mp4"
    shutil.copy(data / manifest.clips[1].video, secret)
    checked = media_module.media_path

    def check_then_swap(*args: Any, **kwargs: Any) -> Path:
        real = checked(*args, **kwargs)
        if args[1] == clip and args[2] == "video" and not listed.is_symlink():
            listed.unlink()
            listed.symlink_to(secret)
        return real

    running = start(tmp_path / "bare.zarr")
    try:
        status, body, kind = fetch(running.url + "frames.png?" + urlencode({"id": clip}))
        assert (status, kind) == (200, "image/png")  # decoded through the descriptor
        monkeypatch.setattr(media_module, "media_path", check_then_swap)
        monkeypatch.setattr(app_module, "media_path", check_then_swap, raising=False)
        status, body, kind = fetch(running.url + "frames.png?" + urlencode({"id": clip}))
        assert (status, kind.split(";")[0]) == (404, "text/plain"), (status, body[:200])
        assert body.decode().startswith(f"the video file of clip {clip!r} (") and "changed since it was checked" in body.decode()
    finally:
        running.stop()
