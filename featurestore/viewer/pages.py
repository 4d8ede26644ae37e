"""The clip page as HTML, rendered on the server from `featurestore.viewer.data.clip_page`'s data.

Server-rendered so the page is whole when it arrives (no second request before the player shows)
and so its server time is the one number the floor bounds. Every value is escaped.
"""
from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

from featurestore.viewer.data import unclaimed


def _q(**params: Any) -> str:
    return escape(urlencode({k: v for k, v in params.items() if v is not None}))


def layout(title: str, body: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<link rel="stylesheet" href="static/view.css"></head><body>{body}</body></html>')


def clip_html(page: dict[str, Any]) -> str:
    """The clip page: metadata, player, frames, log-mel, outputs, neighbours."""
    cid = page["clip_id"]
    parts = [f'<p><a href="./?{_q(set=page["feature_set"])}">&larr; map</a></p>',
             f'<h1 id="clip-id">{escape(cid)}</h1>', _metadata(page), _media(page), _pictures(page),
             _outputs(page), _neighbours(page)]
    return layout(cid, "\n".join(parts))


def _metadata(page: dict[str, Any]) -> str:
    rows = [("label", _label(page, page["label"])), ("city", page["city"]), ("location", page["location"]),
            ("splits", ", ".join(page["splits"]) or page["no_split"]), ("store row", page["row"])]
    cells = "".join(f"<tr><th>{escape(k)}</th><td id='meta-{escape(k.replace(' ', '-'))}'>{escape(str(v))}</td></tr>"
                    for k, v in rows)
    return f'<table class="meta">{cells}</table>'


def _label(page: dict[str, Any], label: str | None) -> str:
    """A class name, or the no-label text that no class of the store has (`unclaimed`)."""
    return label if label is not None else unclaimed("(no label)", page["classes"])


def _media(page: dict[str, Any]) -> str:
    audio = page["media"]["audio"]
    if audio["ok"]:
        return f'<h2>Audio</h2><audio id="audio" controls preload="metadata" src="media?{_q(id=page["clip_id"], kind="audio")}"></audio>'
    return f'<h2>Audio</h2><p class="note" id="audio-note">{escape(audio["note"])}</p>'


def _pictures(page: dict[str, Any]) -> str:
    cid, out = page["clip_id"], []
    if page["frames"] == "video" and not page["media"]["video"]["ok"]:
        out.append(f'<h2>Frames</h2><p class="note" id="frames-note">{escape(page["media"]["video"]["note"])}</p>')
    elif page["frames"]:
        source = "decoded from the video file" if page["frames"] == "video" else f"stored set {page['frames']}"
        out.append(f'<h2>Frames <small>({escape(source)})</small></h2>'
                   f'<img id="frames" class="strip" alt="frames" src="frames.png?{_q(id=cid)}">')
    if page["logmel"]:
        out.append(f'<h2>Log-mel <small>({escape(page["logmel"])})</small></h2>'
                   f'<img id="logmel" class="strip" alt="log-mel" src="logmel.png?{_q(id=cid, set=page["logmel"])}">')
    return "\n".join(out)


def _outputs(page: dict[str, Any]) -> str:
    outputs, classes = page["outputs"], page["classes"]
    if not outputs:
        return "<h2>Predictions</h2><p class='note'>No prediction run or fused output covers this clip.</p>"
    head = "".join(f"<th>{escape(name)}</th>" for name in outputs)
    body = []
    for c, cls in enumerate(classes):
        mark = " class='truth'" if cls == page["label"] else ""
        cells = "".join(_prob_cell(name, cls, probs, c) for name, probs in outputs.items())
        body.append(f"<tr{mark}><th>{escape(cls)}</th>{cells}</tr>")
    return ("<h2>Predictions <small>(clip level: mean over segments)</small></h2>"
            f"<table id='outputs' class='probs'><tr><th>class</th>{head}</tr>{''.join(body)}</table>")


def _prob_cell(name: str, cls: str, probs: list[float], c: int) -> str:
    best = " best" if max(range(len(probs)), key=probs.__getitem__) == c else ""
    return (f"<td class='prob{best}' data-source='{escape(name)}' data-class='{escape(cls)}' "
            f"data-value='{probs[c]!r}' style='--p:{probs[c]:.4f}'>{probs[c]:.4f}</td>")


def _neighbours(page: dict[str, Any]) -> str:
    found = page["neighbours"]
    if found is None:
        return "<h2>Neighbours</h2><p class='note'>The store holds no embedding set to find neighbours in.</p>"
    if page.get("neighbours_note"):
        return f"<h2>Neighbours</h2><p class='note' id='neighbours-note'>{escape(page['neighbours_note'])}</p>"
    if not found:
        return "<h2>Neighbours</h2><p class='note'>This clip has no embedding in the map's set.</p>"
    items = "".join(f"<li><a href='clip?{_q(id=n['clip_id'], set=page['feature_set'])}'>{escape(n['clip_id'])}</a> "
                    f"<span class='label'>{escape(_label(page, n['label']))}</span> "
                    f"<span class='score'>{n['score']:.3f}</span></li>" for n in found)
    return f"<h2>Neighbours <small>in {escape(page['feature_set'])}</small></h2><ol id='neighbours'>{items}</ol>"
