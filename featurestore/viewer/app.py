"""The web app: Starlette routes over `featurestore.viewer.data`, every script served from here.

Routes take clip ids and names as query parameters, never paths: ``clip?id=...``,
``media?id=...&kind=audio``. A percent-encoded slash or ``..`` is then just part of an id the index
does not hold (404). The store is read under one lock: a `FeatureStore` keeps caches that are not
made for concurrent threads, and Starlette runs plain endpoints in a thread pool.

Every answer that is not a page or a picture is one line of plain text (never a traceback): a wrong
parameter is a 400/404 naming it; a store that was deleted or changed under the running app is a
503 saying so, and the server goes on answering. Every response carries ``nosniff`` and a content
security policy that allows no inline script, so nothing a store holds can run in the page even
if it got past the escaping (docs/view.md, "Safety").
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from featurestore.decode._errors import DecodeError
from featurestore.errors import FeatureStoreError, UnknownClipError, UnknownFeatureError
from featurestore.viewer._deps import plotly_js
from featurestore.viewer.data import (BadRequest, ViewState, check_k, clip_page, colour_options, confusion,
                                      map_points_parts, search)
from featurestore.viewer.images import frame_strip, logmel_image, png
from featurestore.viewer.media import MediaMissing, MediaRefused, content_type, open_media

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Plotly's WebGL maps compile shaders with ``Function`` (regl), hence 'unsafe-eval'; inline scripts
#: and event-handler attributes (``onerror=``) stay forbidden, and nothing loads from elsewhere.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; media-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", CSP.encode()),
           (b"referrer-policy", b"no-referrer")]


def create_app(state: ViewState, local_only: bool = True) -> Any:
    """The Starlette app over ``state``; ``local_only`` refuses other Host headers (DNS rebinding)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.routing import Route

    lock = threading.Lock()
    handlers = _Handlers(state, lock)
    routes = [Route("/", handlers.index), Route("/clip", handlers.clip), Route("/media", handlers.media),
              Route("/frames.png", handlers.frames), Route("/logmel.png", handlers.logmel),
              Route("/api/info", handlers.info), Route("/api/points", handlers.points),
              Route("/api/confusion", handlers.confusion), Route("/api/search", handlers.search),
              Route("/static/{name}", handlers.static), Route("/favicon.ico", handlers.no_icon)]
    # level 4: the map's 3.7 MiB of JSON at 100,000 clips in a fraction of level 9's time, for about its size
    middleware = [Middleware(_Guard, local_only=local_only),
                  Middleware(GZipMiddleware, minimum_size=1024, compresslevel=4)]
    return Starlette(routes=routes, middleware=middleware)


def host_name(header: str) -> str:
    """The host name of a Host header without its port: ``[::1]:8765`` -> ``::1``, ``localhost:80`` ->
    ``localhost`` (Starlette's TrustedHostMiddleware cuts at the first colon, so an IPv6 loopback
    address never matched and ``--host ::1`` answered nothing)."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else "?"
        return header[1:end] if rest == "" or (rest[:1] == ":" and rest[1:].isdigit()) else ""
    if ":" not in header:
        return header
    name, _, port = header.partition(":")
    return name if port.isdigit() else ""


class _Guard:
    """ASGI middleware: refuse a Host header that is not a loopback name (DNS rebinding: a page of
    evil.example whose name now points at 127.0.0.1) when listening on loopback, and add the safety
    headers to every response."""

    def __init__(self, app: Any, local_only: bool):
        self.app, self.local_only = app, local_only

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.local_only:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in LOCAL_HOSTS:
                from starlette.responses import PlainTextResponse

                answer = PlainTextResponse(f"refused: Host {host[:80]!r} is not a loopback name "
                                           f"(featurestore view answers {', '.join(sorted(LOCAL_HOSTS))})", 400)
                return await answer(scope, receive, _with_headers(send))
        return await self.app(scope, receive, _with_headers(send))


def _with_headers(send: Any) -> Any:
    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
        await send(message)

    return sending


class _Handlers:
    """Plain (thread-pool) endpoints; each maps the store's errors to a 404/400 with their one line."""

    def __init__(self, state: ViewState, lock: threading.Lock):
        self.state, self.lock = state, lock
        self.n_clips = int(state.store.n_clips)  # the index the app shows (read once, docs/view.md)
        self.statics = {"plotly.min.js": plotly_js(), "view.js": STATIC / "view.js", "view.css": STATIC / "view.css"}

    def _answer(self, make: Callable[[], Any]) -> Any:
        from starlette.responses import PlainTextResponse

        try:
            with self.lock:
                return make()
        except (UnknownClipError, UnknownFeatureError, MediaRefused, MediaMissing) as err:
            gone = self._store_gone()  # a store deleted under the app: its sets read as unknown now
            if gone:
                return PlainTextResponse(f"{gone} ({_one_line(err)}); restart featurestore view", status_code=503)
            # an unknown clip id (media says it as a MediaRefused caused by one): maybe appended since the start
            unknown_clip = isinstance(err, UnknownClipError) or isinstance(err.__cause__, UnknownClipError)
            grown = self._clips_added() if unknown_clip else ""
            return PlainTextResponse(_one_line(err) + grown, status_code=404)
        except BadRequest as err:
            return PlainTextResponse(_one_line(err), status_code=400)
        except Exception as err:  # noqa: BLE001 - the browser gets one line, never a traceback
            gone = self._store_gone()
            if gone:
                return PlainTextResponse(f"{gone} ({_one_line(err)}); restart featurestore view", status_code=503)
            if isinstance(err, (DecodeError, OSError)):  # a listed video that does not decode, an unreadable file
                return PlainTextResponse(_one_line(err), status_code=422)
            if isinstance(err, (FeatureStoreError, ValueError, KeyError)):
                return PlainTextResponse(_one_line(err), status_code=400)
            return PlainTextResponse(f"featurestore view could not answer: {_one_line(err)}", status_code=500)

    def _clips_added(self) -> str:
        """Why an unknown clip may be in the store after all: clips appended since the app started
        (it shows the store as it was then), said with the way to see them; else ''. One attribute
        read, on a 404 only."""
        try:
            now = int(self.state.store.arrays.read_attr("", "n_clips"))
        except Exception:  # noqa: BLE001 - a store that cannot be read now: the 404 alone
            return ""
        if now <= self.n_clips:
            return ""
        return (f" (the store now holds {now} clips, {now - self.n_clips} added since featurestore view "
                f"started with {self.n_clips}: restart it to see them)")

    def _store_gone(self) -> str | None:
        """A sentence when the store the app opened is no longer at its path (deleted, moved,
        replaced by another), else None. Stores at URLs are not checked (None)."""
        location = str(self.state.store.location)
        if "://" in location and not location.startswith("file://"):
            return None
        path = Path(location.removeprefix("file://"))
        try:
            same = path.exists() and path.stat().st_ino == self.state.store_inode
        except OSError:
            same = False
        if same:
            return None
        return f"the store {path} was deleted or replaced while featurestore view runs"

    def index(self, request: Any) -> Any:
        from starlette.responses import FileResponse

        return FileResponse(STATIC / "index.html", media_type="text/html")

    def no_icon(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(status_code=204)

    def static(self, request: Any) -> Any:
        from starlette.responses import FileResponse, PlainTextResponse

        path = self.statics.get(request.path_params["name"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "max-age=86400"})

    def clip(self, request: Any) -> Any:
        from starlette.responses import HTMLResponse

        from featurestore.viewer.pages import clip_html

        q = request.query_params
        return self._answer(lambda: HTMLResponse(clip_html(clip_page(self.state, q.get("id", ""),
                                                                     self._set(q.get("set"))))))

    def media(self, request: Any) -> Any:
        q = request.query_params

        def serve() -> Any:
            file, info, real = open_media(self.state.store, q.get("id", ""), q.get("kind", ""), self.state.attrs,
                                          self.state.value)
            return file_response(request, file, info, content_type(real))

        return self._answer(serve)

    def frames(self, request: Any) -> Any:
        return self._answer(lambda: _png(self._frames(request.query_params.get("id", ""))))

    def _frames(self, clip_id: str) -> Any:
        from featurestore.viewer.data import frames_source

        store = self.state.store
        source = frames_source(self.state, store.row(clip_id))
        if source is None:
            raise MediaMissing(f"clip {clip_id!r} has no frames")
        if source != "video":
            return frame_strip(store.get(source, clip_id), channels_first=True)
        from featurestore.decode.video import sample_frames

        n = int(self.state.attrs.get("video_frames") or 5)
        file, _, real = open_media(store, clip_id, "video", self.state.attrs, self.state.value)
        with file:  # decoded through the descriptor opened (see open_media), not the path opened again
            held = Path(f"/proc/self/fd/{file.fileno()}")
            try:
                frames = sample_frames(held if held.exists() else real, n)
            except DecodeError as err:
                raise DecodeError(real, err.reason) from err
        return frame_strip(frames, channels_first=False)

    def logmel(self, request: Any) -> Any:
        q = request.query_params
        return self._answer(lambda: _png(logmel_image(self.state.store.get(self._logmel_set(q.get("set", "")),
                                                                           q.get("id", "")))))

    def _logmel_set(self, name: str) -> str:
        """``name`` when it is a log-mel set (`logmel_sets`), else UnknownFeatureError (404) naming them:
        any other set's arrays are not a spectrogram (frames gave a 500 from Pillow, an embedding a
        400 'axis 1 is out of bounds', neither naming the set)."""
        if name not in self.state.logmel_sets:
            raise UnknownFeatureError("log-mel set", name, self.state.logmel_sets)
        return name

    def info(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return self._answer(lambda: JSONResponse(self._info()))

    def _info(self) -> dict[str, Any]:
        store = self.state.store
        return {"store": str(store.location), "n_clips": store.n_clips, "classes": list(store.classes),
                "feature_sets": {name: {"method": p.method, "n": len(p.rows)} for name, p in self.state.projections.items()},
                "colours": colour_options(self.state), "outputs": list(self.state.sources), "splits": self.state.splits}

    def points(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        q = request.query_params  # the pieces are made under the lock, then streamed (see map_points_parts)
        return self._answer(lambda: StreamingResponse(iter(map_points_parts(self.state, self._set(q.get("set")),
                                                                            q.get("colour", "label"))),
                                                      media_type="application/json"))

    def confusion(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        q = request.query_params
        return self._answer(lambda: JSONResponse(confusion(self.state, q.get("source", ""), q.get("split") or None)))

    def search(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        q = request.query_params
        return self._answer(lambda: JSONResponse(search(self.state, self._set(q.get("set")), q.get("q", ""),
                                                       check_k(q.get("k")))))

    def _set(self, name: str | None) -> str | None:
        """The map set asked for (first one by default); an unknown name is UnknownFeatureError."""
        sets = self.state.projections
        if not name:
            return next(iter(sets), None)
        if name not in sets:
            raise UnknownFeatureError("feature set on the map", name, list(sets))
        return name


class _Unsatisfiable(Exception):
    """A byte range that starts past the file's end (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a ``Range: bytes=...`` header over a file of ``size`` bytes, or None to
    send the whole file: no header, several ranges, or one that is not a byte range (RFC 9110
    lets a server ignore Range; a media player asks one range at a time). A range starting past
    the end is `_Unsatisfiable`."""
    import re

    found = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if found is None or found.groups() == ("", ""):
        return None
    first, last = (None if not v else int(v) if len(v) <= 30 else 10 ** 30 for v in found.groups())  # no 4,300-digit int()
    if first is None:  # the last ``last`` bytes
        if last == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - last), size
    if last is not None and last < first:
        return None
    if first >= size:
        raise _Unsatisfiable
    return first, size if last is None else min(size, last + 1)


def file_response(request: Any, file: Any, info: Any, media_type: str) -> Any:
    """A response that reads the open ``file`` (``info``: its fstat) and closes it: the whole file, or
    the one byte range asked (206; 416 past the end). Starlette's FileResponse opens a path again
    when it sends, which is what `open_media` exists to avoid."""
    from email.utils import formatdate

    from starlette.responses import Response, StreamingResponse

    size = int(info.st_size)
    common = {"accept-ranges": "bytes", "etag": f'"{info.st_mtime_ns:x}-{size:x}"',
              "last-modified": formatdate(info.st_mtime, usegmt=True)}
    if_range = request.headers.get("if-range")
    asked = request.headers.get("range") if if_range in (None, common["etag"], common["last-modified"]) else None
    try:
        span = byte_range(asked, size) if request.method in ("GET", "HEAD") else None
    except _Unsatisfiable:
        file.close()
        return Response(status_code=416, headers={**common, "content-range": f"bytes */{size}"})
    start, stop = span or (0, size)
    headers = {**common, "content-length": str(stop - start)}
    if span:
        headers["content-range"] = f"bytes {start}-{stop - 1}/{size}"
    if request.method == "HEAD":
        file.close()
        return Response(status_code=206 if span else 200, headers=headers, media_type=media_type)
    return StreamingResponse(_chunks(file, start, stop), status_code=206 if span else 200, headers=headers,
                             media_type=media_type)


def _chunks(file: Any, start: int, stop: int, size: int = 1 << 16) -> Any:
    """Bytes ``start:stop`` of the open ``file`` (pread: no shared offset), closing it at the end."""
    import os

    with file:
        while start < stop:
            chunk = os.pread(file.fileno(), min(size, stop - start), start)
            if not chunk:  # the file shrank since its fstat: the short body ends the connection
                return
            start += len(chunk)
            yield chunk


def _png(rgb: Any) -> Any:
    from starlette.responses import Response

    return Response(png(rgb), media_type="image/png")


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 and type(err).__str__ is KeyError.__str__ \
        else str(err)
    return text.splitlines()[0] if text else type(err).__name__
